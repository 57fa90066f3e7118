"""Every ```bash and ```python block of docs/*.md and README.md runs, page by page, as a reader would run it.

Each page runs in its own directory, prepared with generated stand-ins for the files it names (see
tests/docs_snippets.py): small random-weight checkpoints under `converted/` and `converted-fused/`, a small BPE
under `roberta-base/`, `my_sounds/`, LAION shards under `shards/`; a full-size random laion-clap
`630k-audioset-best.pt` and a small HF `clap-htsat-unfused/` only for pages whose blocks name them; for pages
whose blocks name a model by its Hub name (`laion/clap-htsat-unfused`, a laion-clap release name), a Hub cache
in huggingface_hub's layout (docs_snippets.write_hub_cache) as HF_HUB_CACHE, offline: a name it lacks fails.
The venv's and the launch shims' `bin` come first on PATH. A failing block fails its page with the page,
the block number and the output.

Two things are not run here, on purpose and by name:
* README's two-command block (`make demo` / `make test`): running `make test` inside the suite would recurse
  and `make demo` takes ~8 minutes. The test checks both targets exist (`make -n`); CI runs `make test`
  itself and tests/test_demo.py runs the demo's code path.
* docs/finetuning.md: tests/test_finetune_recipe.py runs every block of it (and asserts that the result
  beats the starting checkpoint), so running it twice would only cost time. The test below checks that
  file still does so.
"""
import os
import re
import shutil
import subprocess

import pytest

import docs_snippets as D
from clapjax.convert import hub

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(f"docs/{f}" for f in os.listdir(os.path.join(REPO, "docs")) if f.endswith(".md")) + ["README.md"]
RUN_ELSEWHERE = {"docs/finetuning.md": "tests/test_finetune_recipe.py"}
TWO_COMMANDS = ("make demo   # sets up .venv, then runs the main job on the embedded default data\n"
                "make test   # sets up .venv, then runs the test suite (offline: HF_HUB_OFFLINE=1)\n")

# name a block uses → how to make it; each is placed only in the pages whose blocks name it (light ones
# copied, heavy ones linked), except where the page makes that name itself (MADE_BY_PAGE)
LIGHT = {"roberta-base": D.write_tokenizer, "converted": D.write_small_checkpoint,
         "converted-fused": lambda d: D.write_small_checkpoint(d, fusion=True), "my_sounds": D.write_sound_folder,
         "shards": D.write_shards}
HEAVY = {"630k-audioset-best.pt": D.write_laion_checkpoint, "clap-htsat-unfused": D.write_hf_checkpoint}
MADE_BY_PAGE = {"README.md": {"converted"}, "docs/converting.md": {"converted"}}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs-assets")
    for name, make in LIGHT.items():
        make(str(root / name))
    return root


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory):
    """Built on first use: most pages name no Hub model."""
    built = []

    def get():
        if not built:
            built.append(D.write_hub_cache(tmp_path_factory.mktemp("docs-hub")))
        return built[0]
    return get


HUB_NAME = re.compile(r"(?<![\w.-])[\w.-]+/[\w.-]+(?![\w/-])")


def hub_names(code: str) -> set[str]:
    """The Hub repo ids (ORG/NAME in quotes or as a command argument) and laion-clap release names a page uses."""
    repos = {m.group(0) for m in HUB_NAME.finditer(code) if m.group(0).split("/")[0] in ("laion", "lukewys")}
    return repos | {name for name in hub.LAION_RELEASES if _named(name, code)}


def check_hub_names(page: str, code: str) -> set[str]:
    missing = hub_names(code) - set(D.HUB_REPOS)
    assert not missing, (f"{page} names {', '.join(sorted(missing))}, which the docs' Hub cache does not hold "
                         "(docs_snippets.HUB_REPOS): the page would fail offline")
    return hub_names(code)


def _heavy(root, name):
    path = root / name
    if not path.exists():
        HEAVY[name](str(path))
    return path


def _named(name: str, code: str) -> bool:
    return re.search(r"(?<![\w.-])" + re.escape(name) + r"(?![\w.-])", code) is not None


def prepare(page, page_dir, assets, blocks) -> None:
    D.link_repo(str(page_dir), REPO)
    code = "\n".join(b.code for b in blocks)
    for name in LIGHT:
        if _named(name, code) and name not in MADE_BY_PAGE.get(page, ()):
            shutil.copytree(assets / name, page_dir / name)
    for name in HEAVY:
        if _named(name, code):  # read-only inputs: linked, not copied (the .pt is ~600 MB)
            os.symlink(_heavy(assets, name), page_dir / name)


def _two_command_block(blocks):
    found = [b for b in blocks if b.lang == "bash" and b.code == TWO_COMMANDS]
    assert len(found) == 1, "README.md must keep its two-command block exactly (make demo / make test)"
    return found[0]


@pytest.mark.parametrize("page", [p for p in PAGES if p not in RUN_ELSEWHERE])
def test_page_runs(page, assets, hub_root, tmp_path, capsys):
    blocks = D.read_page(os.path.join(REPO, page), label=page)
    todo = D.runnable(blocks)
    if page == "README.md":
        stand_in = _two_command_block(blocks)
        todo = [b for b in todo if b is not stand_in]
        with capsys.disabled():
            print(f"\n{stand_in.where}: `make demo` / `make test` are not run inside the suite (recursion; "
                  "~8 min): checking the targets with `make -n`; CI runs `make test`, test_demo.py the demo")
        for target in ("demo", "test"):
            proc = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr
            assert ("clapjax.app.demo" if target == "demo" else "pytest") in proc.stdout, proc.stdout
    prepare(page, tmp_path, assets, todo)
    uses_hub = check_hub_names(page, "\n".join(b.code for b in todo))
    with D.Session(tmp_path, D.docs_env(REPO, hub=hub_root() if uses_hub else None), timeout=540) as session:
        for block in todo:
            session.run(block)


def test_every_page_is_run_and_every_block_is_labelled():
    """A new page is picked up by itself; a block without a language fails (read_page raises)."""
    assert "README.md" in PAGES and "docs/numbers.md" in PAGES
    for page in PAGES:
        D.read_page(os.path.join(REPO, page), label=page)
    for page, runner in RUN_ELSEWHERE.items():
        with open(os.path.join(REPO, runner)) as f:
            assert page in f.read(), f"{runner} no longer runs {page}"


def test_a_broken_block_fails_naming_page_block_and_output(tmp_path):
    page = tmp_path / "broken.md"
    page.write_text("# t\n\n```bash\necho fine\nX=5\n```\n\n```text\nnot run\n```\n\n"
                    "```python\nprint('py', 1 + 1)\n```\n\n```bash\necho $X; false; echo never\n```\n")
    blocks = D.read_page(str(page), label="broken.md")
    assert [b.lang for b in blocks] == ["bash", "text", "python", "bash"]
    with D.Session(tmp_path, D.docs_env(REPO), timeout=60, echo=lambda s: None) as s:
        assert "fine" in s.run(blocks[0])
        assert "py 2" in s.run(blocks[2])
        with pytest.raises(D.SnippetFailed) as err:
            s.run(blocks[3])
    msg = str(err.value)
    assert "broken.md block 4 (bash, line 16)" in msg and "5" in msg.split("--- output ---")[1]
    assert "never" not in msg.split("--- output ---")[1]
    (tmp_path / "unlabelled.md").write_text("```\nls\n```\n")
    with pytest.raises(ValueError, match="needs a language"):
        D.read_page(str(tmp_path / "unlabelled.md"))


def test_a_page_naming_a_model_the_hub_cache_lacks_fails():
    code = 'clap = clapjax.CLAP.from_pretrained("laion/clap-htsat-unfused")\nclapjax download 630k-best\n'
    assert hub_names(code) == {"laion/clap-htsat-unfused", "630k-best"}
    assert hub_names("clapjax convert 630k-audioset-best.pt converted/ && ls roberta-base/ my_sounds/") == set()
    with pytest.raises(AssertionError, match="x.md names 630k-best, which the docs' Hub cache does not hold"):
        check_hub_names("x.md", code)
