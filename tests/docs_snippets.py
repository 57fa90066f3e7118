"""Run the code blocks of a Markdown page the way a reader would: in order, in one session.

Every fenced block carries a language. ```bash blocks run in one persistent bash (`set -eo pipefail`;
variables and `cd` carry over), ```python blocks in one persistent Python interpreter (names carry
over), interleaved in page order, in one working directory. Blocks in `NOT_RUN` languages (output,
file contents) are shown, not run. A block without a language, or in a language that is neither,
is an error: a page must say what each block is.

    page = read_page("docs/finetuning.md")
    with Session(workdir, env) as s:
        for block in page:
            s.run(block)          # raises SnippetFailed naming the page, block number, line and output
"""
from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time

RUN = ("bash", "python")
NOT_RUN = ("text", "json", "jsonl", "csv")
FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
SENTINEL = "__clapjax_docs_block_done__"

# the Python side of a session: exec each block (sent as one JSON line) in one namespace
_PY_DRIVER = r"""
import json, sys, traceback
namespace = {"__name__": "__main__"}
for line in sys.stdin:
    msg = json.loads(line)
    status = "ok"
    try:
        exec(compile(msg["code"], msg["name"], "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        status = "failed"
    sys.stdout.flush(); sys.stderr.flush()
    print("%s " + status, flush=True)
""" % SENTINEL


@dataclasses.dataclass(frozen=True)
class Block:
    page: str          # the page's path as given
    number: int        # 1-based, counting every fenced block of the page
    lang: str
    code: str
    line: int          # line of the opening fence

    @property
    def where(self) -> str:
        return f"{self.page} block {self.number} ({self.lang}, line {self.line})"


class SnippetFailed(AssertionError):
    pass


def read_page(path: str, label: str | None = None) -> list[Block]:
    """Every fenced block of the page; ValueError for a block without a known language."""
    with open(path) as f:
        text = f.read()
    label = label or path
    blocks = []
    for n, m in enumerate(FENCE.finditer(text), 1):
        lang = m.group(1).lower()
        line = text.count("\n", 0, m.start()) + 1
        if lang not in RUN + NOT_RUN:
            raise ValueError(f"{label} line {line}: a ``` block needs a language: one of {RUN} (run by "
                             f"tests/test_docs.py) or {NOT_RUN} (shown only); got {lang or 'none'!r}")
        blocks.append(Block(label, n, lang, m.group(2), line))
    return blocks


def runnable(blocks: list[Block]) -> list[Block]:
    return [b for b in blocks if b.lang in RUN]


class _Process:
    """A child whose merged stdout/stderr is read line by line on a thread (so waits can time out)."""

    def __init__(self, argv, cwd, env):
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def send(self, text: str) -> None:
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def wait_for_sentinel(self, timeout: float) -> tuple[str | None, str]:
        """(status word after the sentinel, or None if the process ended / timed out; the output)."""
        out, deadline = [], time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    return None, "".join(out) + f"\n[timed out after {timeout:.0f} s]"
                continue
            if line is None:
                return None, "".join(out) + f"\n[the session ended, exit status {self.proc.wait()}]"
            if line.startswith(SENTINEL):
                return line.split()[1], "".join(out)
            out.append(line)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


class Session:
    """One bash and one Python session sharing `cwd`, started on first use."""

    def __init__(self, cwd: str, env: dict, *, timeout: float = 600.0, echo=print):
        self.cwd, self.env, self.timeout, self.echo = str(cwd), dict(env), timeout, echo
        self._bash = self._py = None
        self._count = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in (self._bash, self._py):
            if p is not None:
                p.close()

    def run(self, block: Block) -> str:
        """Run one block; its output, or SnippetFailed with the page, block number and output."""
        if block.lang not in RUN:
            raise ValueError(f"{block.where} is not run")
        started = time.monotonic()
        if block.lang == "bash":
            status, out = self._run_bash(block)
        else:
            status, out = self._run_python(block)
        self.echo(f"--- {block.where}: {status or 'failed'} in {time.monotonic() - started:.1f} s\n{out}")
        if status != "ok":
            raise SnippetFailed(f"{block.where} failed:\n{block.code}\n--- output ---\n{out[-6000:]}")
        return out

    def _run_bash(self, block: Block):
        if self._bash is None:
            self._bash = _Process(["bash", "--noprofile", "--norc"], self.cwd, self.env)
            self._bash.send("set -eo pipefail\n")
        self._count += 1
        script = os.path.join(self.cwd, f".docs-block-{self._count}.sh")
        with open(script, "w") as f:
            f.write(block.code)
        # sourced (not piped), so a command that reads stdin cannot eat the session's input
        self._bash.send(f"source {script} < /dev/null\necho {SENTINEL} ok\n")
        return self._bash.wait_for_sentinel(self.timeout)

    def _run_python(self, block: Block):
        if self._py is None:
            self._py = _Process([sys.executable, "-u", "-c", _PY_DRIVER], self.cwd, self.env)
        self._py.send(json.dumps({"code": block.code, "name": f"<{block.where}>"}) + "\n")
        return self._py.wait_for_sentinel(self.timeout)


# --- generated stand-ins for what the pages name ------------------------------------------------------
# Small, random-weight or procedural versions of the files a reader would have, written under the names
# the pages use (`converted/`, `roberta-base/`, `my_sounds/`, `shards/`, `630k-audioset-best.pt`, …).

SR = 48000
SMALL_VOCAB = 300     # the tiny config's text vocabulary; the generated tokenizer stays inside it


def write_tokenizer(directory) -> str:
    """A byte-level BPE (RoBERTa's special ids) trained on the synthetic captions and the page words."""
    from clapjax import synthetic
    from clapjax.tokenizer import train_byte_level_bpe
    extra = ["a dog barks", "rain on a roof", "a siren", "dog", "rain", "siren", "This is a sound of {}."]
    return train_byte_level_bpe(synthetic.caption_corpus(0, 400) + extra * 5, directory, vocab_size=SMALL_VOCAB)


def write_small_checkpoint(directory, *, fusion: bool = False, seed: int = 0) -> str:
    """The tiny config's model (random weights) in the converter's format, under `directory`."""
    import jax
    from flax import nnx
    from clapjax import saved_model
    from clapjax.model import CLAPModel
    from clapjax.train import config as C
    cfg = C.model_config(C.load_config("tiny", ["model.enable_fusion=True"] if fusion else []))
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: CLAPModel(cfg, nnx.Rngs(seed))))
    # one compiled initialiser instead of one small program per variable (eager init takes ~25 s)
    state = jax.jit(lambda: nnx.split(CLAPModel(cfg, nnx.Rngs(seed)))[1],
                    compiler_options={"xla_backend_optimization_level": 0})()
    saved_model.save(str(directory), nnx.merge(graphdef, state), source_format="clapjax-train")
    return str(directory)


def synthetic_clips(n: int, seconds: float = 1.0, seed: int = 0):
    from clapjax import synthetic
    return synthetic.synthetic_dataset(seed, n, "train", clip_samples=int(seconds * SR), mix_probability=0.0)


def write_sound_folder(directory) -> str:
    """`dog.wav`, `rain.flac` (44.1 kHz stereo), `long_rain.wav` (3 s) and two more clips."""
    import numpy as np
    import soundfile as sf
    os.makedirs(directory, exist_ok=True)
    ds = synthetic_clips(4)
    sf.write(os.path.join(directory, "dog.wav"), ds.waveform(0), SR)
    rain = np.random.default_rng(1).uniform(-0.3, 0.3, (44100, 2)).astype(np.float32)
    sf.write(os.path.join(directory, "rain.flac"), rain, 44100)
    sf.write(os.path.join(directory, "long_rain.wav"),
             np.random.default_rng(2).uniform(-0.3, 0.3, 3 * SR).astype(np.float32), SR)
    for i in (2, 3):
        sf.write(os.path.join(directory, f"clip{i}.wav"), ds.waveform(i), SR)
    return str(directory)


def write_captioned_folder(directory, n: int = 40, seed: int = 0) -> str:
    """`n` synthetic 1 s clips (`clipNN.wav`) and `captions.jsonl` with their 5 captions each."""
    import soundfile as sf
    os.makedirs(directory, exist_ok=True)
    ds = synthetic_clips(n, seed=seed)
    with open(os.path.join(directory, "captions.jsonl"), "w") as f:
        for i in range(n):
            sf.write(os.path.join(directory, f"clip{i:02d}.wav"), ds.waveform(i), SR)
            f.write(json.dumps({"path": f"clip{i:02d}.wav", "captions": list(ds.captions[i])}) + "\n")
    return str(directory)


def write_shards(directory, shards: int = 2, per_shard: int = 8) -> str:
    """LAION webdataset shards `000000.tar`, … (`<key>.flac` + `<key>.json`) and `sizes.json`."""
    import io
    import tarfile
    import soundfile as sf
    os.makedirs(directory, exist_ok=True)
    ds = synthetic_clips(shards * per_shard, seed=1)
    sizes = {}
    for s in range(shards):
        name = f"{s:06d}.tar"
        with tarfile.open(os.path.join(directory, name), "w") as tf:
            for i in range(s * per_shard, (s + 1) * per_shard):
                buf = io.BytesIO()
                sf.write(buf, ds.waveform(i), SR, format="FLAC")
                for ext, data in (("flac", buf.getvalue()),
                                  ("json", json.dumps({"text": list(ds.captions[i])}).encode())):
                    info = tarfile.TarInfo(f"{i:07d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        sizes[name] = per_shard
    with open(os.path.join(directory, "sizes.json"), "w") as f:
        json.dump(sizes, f)
    return str(directory)


def write_laion_checkpoint(path) -> str:
    """A full-size random-init laion-clap HTSAT-tiny + RoBERTa-base `.pt`, laid out like the released files
    (`state_dict` with DDP's `module.` prefix, `position_ids` included, NumPy scalars in the pickle)."""
    import numpy as np
    import torch
    from clapjax.convert import torch_reference
    model = torch_reference.laion_clap_model("HTSAT-tiny", "roberta")
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    sd["module.text_branch.embeddings.position_ids"] = torch.arange(514)[None]
    torch.save({"epoch": np.int64(1), "name": "random-init", "state_dict": sd}, str(path))
    return str(path)


def write_hf_checkpoint(directory) -> str:
    """A small random HF `ClapModel` (`save_pretrained` layout), unfused."""
    import torch
    from transformers import ClapConfig, ClapModel
    torch.manual_seed(0)
    cfg = ClapConfig(text_config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                                      vocab_size=1000, layer_norm_eps=1e-5),
                     audio_config=dict(depths=[1, 1, 1, 1], patch_embeds_hidden_size=16, hidden_size=128,
                                       num_attention_heads=[1, 2, 2, 4], enable_fusion=False), projection_dim=32)
    ClapModel(cfg).eval().save_pretrained(str(directory))
    return str(directory)


HUB_REPOS = ("laion/clap-htsat-unfused",)   # the model names a page may use: what write_hub_cache holds


def write_hub_cache(root) -> str:
    """A Hugging Face Hub cache in huggingface_hub's layout (tests/hub_cache.py) holding a tiny random
    `ClapModel` with its tokenizer files under each name of HUB_REPOS."""
    import hub_cache
    tokenizer = write_tokenizer(os.path.join(str(root), "bpe"))
    for n, repo in enumerate(HUB_REPOS):
        files, _ = hub_cache.write_clap_repo_files(os.path.join(str(root), "src", str(n)), tokenizer, seed=n)
        hub_cache.add_commit(os.path.join(str(root), "hub"), repo, files)
    return os.path.join(str(root), "hub")


def docs_env(repo: str, extra_path: tuple[str, ...] = (), hub: str | None = None) -> dict:
    """The reader's environment: the venv's and the launch shims' bin first on PATH, offline (with `hub` as
    the Hub cache when given), one CPU device (no XLA_FLAGS from the test process), the repository importable."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               CLAPJAX_REPO=repo)
    if hub is not None:
        env["HF_HUB_CACHE"] = hub
    env["PATH"] = os.pathsep.join([os.path.join(repo, ".venv", "bin"), os.path.join(repo, "tests", "shims"),
                                   *extra_path, env.get("PATH", "")])
    return env


REPO_LINKS = (".venv", "scripts", "train")   # what a page's commands may name relative to the repository root


def link_repo(page_dir: str, repo: str) -> None:
    """Pages are written for the repository root (`.venv/bin/clapjax`, `scripts/…`); a page runs in its own
    directory with these linked in, so it cannot touch the checkout."""
    for name in REPO_LINKS:
        target = os.path.join(page_dir, name)
        if os.path.exists(os.path.join(repo, name)) and not os.path.lexists(target):
            os.symlink(os.path.join(repo, name), target)
