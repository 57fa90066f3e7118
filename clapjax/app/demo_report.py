"""What `make demo` prints and draws after training (clapjax.app.demo runs it).

The report leads with the held-out figures a reader should judge the run by, each beside what it
is compared with: retrieval both ways against chance and against its ceiling (many held-out clips
share every attribute their captions name, so strict R@1 cannot reach 1; train/evaluate.py computes
the exact ceiling), the attribute-match top-1 a perfect model scores 1.0 on, and zero-shot accuracy
per attribute family against chance. Plots go to WORKDIR/plots/.
"""
from __future__ import annotations

import os

import numpy as np

DIRECTIONS = (("text_to_audio", "text→audio"), ("audio_to_text", "audio→text"))


def lead_report(result, heldout, steps: int) -> list[str]:
    """The headline lines: retrieval vs chance and ceiling, attribute match, zero-shot per family."""
    m, c = result.metrics, result.chance
    groups = len(np.unique(heldout.description_groups()))
    lines = [f"held-out split after {steps} steps: {len(heldout)} clips in {groups} described combinations "
             f"(none of their attribute combinations occurs in training), {heldout.captions_per_clip} captions each",
             f"{'':<22}{'R@1':>8}{'R@5':>8}{'mAP@10':>8}"]
    for key, name in DIRECTIONS:
        lines.append(f"{name:<22}" + "".join(f"{m[f'{key}_{k}']:>8.3f}" for k in ("R@1", "R@5", "mAP@10")))
    lines.append(f"{'chance':<22}" + "".join(f"{c[f'retrieval/{k}']:>8.3f}" for k in ("R@1", "R@5", "mAP@10")))
    for key, name in DIRECTIONS:
        r1, ceiling = m[f"{key}_R@1"], m[f"{key}_R@1_ceiling"]
        lines.append(f"held-out {name} R@1 {r1:.3f} of ceiling {ceiling:.3f} ({r1 / ceiling:.0%} of the ceiling, "
                     f"{r1 / c['retrieval/R@1']:.0f}× chance)")
    match_chance = c["retrieval/attribute_match@1"]
    lines.append("attribute-match top-1 (the top-ranked item has every attribute the query names): "
                 + ", ".join(f"{name} {m[f'{key}_attribute_match@1']:.3f}" for key, name in DIRECTIONS)
                 + f" (chance {match_chance:.3f})")
    lines.append("zero-shot top-1 on held-out clips, per attribute family:")
    for family, acc, chance in zero_shot_rows(result):
        lines.append(f"  {family:<12}{acc:>7.3f}   chance {chance:.3f}   {acc / chance:>4.1f}× chance")
    lines.append(meaning(result))
    return lines


def zero_shot_rows(result) -> list[tuple[str, float, float]]:
    m, c = result.metrics, result.chance
    names = sorted(k.split("/")[1] for k in m if k.startswith("zero_shot/") and k.endswith("/top1"))
    return [(n, m[f"zero_shot/{n}/top1"], c[f"zero_shot/{n}/top1"]) for n in names]


def meaning(result) -> str:
    m = result.metrics
    share = m["text_to_audio_R@1"] / m["text_to_audio_R@1_ceiling"]
    rows = zero_shot_rows(result)
    worst = min(rows, key=lambda r: r[1] / r[2])
    return (f"what it means: for sound combinations it never heard in training, the model picks a clip with every "
            f"named attribute for {m['text_to_audio_attribute_match@1']:.0%} of captions and reaches {share:.0%} of "
            f"the best possible strict R@1; its weakest zero-shot family ({worst[0]}) is at {worst[1] / worst[2]:.1f}× "
            f"chance.")


# --- plots ----------------------------------------------------------------------------------------

def plot(workdir: str, history: list[dict], result, heldout) -> list[str]:
    """Loss, recall, the grouped held-out similarity matrix and zero-shot accuracy, as PNG files."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from clapjax.train.metrics import read_metrics
    out = os.path.join(workdir, "plots")
    os.makedirs(out, exist_ok=True)
    paths = []

    def save(fig, name):
        paths.append(os.path.join(out, name))
        fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)

    rows = read_metrics(workdir)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set(xlabel="step", ylabel="contrastive loss", title="training loss")
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in [("text_to_audio_R@1", "text→audio R@1"), ("audio_to_text_R@1", "audio→text R@1"),
                       ("text_to_audio_attribute_match@1", "text→audio attribute match")]:
        ax.plot([h["step"] for h in history], [h["metrics"][key] for h in history], marker="o", label=label)
    ax.axhline(result.metrics["text_to_audio_R@1_ceiling"], color="black", ls=":", label="R@1 ceiling")
    ax.axhline(result.chance["retrieval/R@1"], color="grey", ls="--", label="chance R@1")
    ax.set(xlabel="step", ylabel="held-out score", title="held-out retrieval", ylim=(0, 1))
    ax.legend()
    save(fig, "recall.png")

    # clips and their first captions in the same order, grouped by described combination: a model
    # that reads the attributes shows bright blocks on the diagonal
    groups = heldout.description_groups()
    order = np.argsort(groups, kind="stable")
    k = heldout.captions_per_clip
    a, t = np.asarray(result.audio_embeddings)[order], np.asarray(result.text_embeddings)[order * k]
    fig, ax = plt.subplots(figsize=(6, 6))
    im = ax.imshow(a @ t.T, cmap="viridis", interpolation="nearest")
    edges = np.flatnonzero(np.diff(groups[order])) + 0.5
    for e in edges:
        ax.axhline(e, color="white", lw=0.2)
        ax.axvline(e, color="white", lw=0.2)
    ax.set(xlabel="caption (each clip's first), grouped by combination", ylabel="clip, grouped by combination",
           title=f"held-out cosine similarity ({len(a)}×{len(a)}, {len(edges) + 1} combinations)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    save(fig, "similarity.png")

    zs = zero_shot_rows(result)
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(len(zs))
    ax.bar(x, [r[1] for r in zs], color="tab:blue", label="zero-shot top-1")
    ax.scatter(x, [r[2] for r in zs], color="black", marker="_", s=600, label="chance", zorder=3)
    ax.scatter(x, [min(0.8, 3 * r[2]) for r in zs], color="red", marker="_", s=600, label="3× chance or 0.8",
               zorder=3)
    ax.set_xticks(x, [r[0] for r in zs], rotation=20)
    ax.set(ylabel="top-1 accuracy (held-out clips)", ylim=(0, 1.05), title="zero-shot accuracy per attribute family")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save(fig, "zero_shot.png")
    return paths


# --- the trained model as a user sees it ------------------------------------------------------------

def top_captions_through_api(model_dir: str, tokenizer_dir: str, heldout, clips=(0, 1, 2, 3), top: int = 3) -> list[str]:
    """Embed held-out clips with `clapjax.CLAP` (the public API) and rank one caption per held-out
    combination for each; ✓ marks a caption that describes the clip exactly."""
    import clapjax
    from clapjax.app.api import cosine_top_k
    clap = clapjax.CLAP.from_pretrained(model_dir, tokenizer=tokenizer_dir)
    groups = heldout.description_groups()
    first = {g: int(np.flatnonzero(groups == g)[0]) for g in np.unique(groups)}
    candidates = [heldout.captions[i][0] for i in first.values()]
    candidate_groups = np.array(list(first))
    audio = clap.get_audio_embedding_from_data(heldout.waveforms(list(clips)))
    text = clap.get_text_embedding(candidates)
    idx, scores = cosine_top_k(audio, text, top)
    lines = [f"the trained model through the public API (clapjax.CLAP.from_pretrained({model_dir!r}, "
             f"tokenizer={tokenizer_dir!r})): {len(clips)} held-out clips against {len(candidates)} captions, "
             f"one per held-out combination"]
    for clip, row, row_scores in zip(clips, idx, scores):
        lines.append(f"  clip {clip} ({heldout.captions[clip][1]!r}):")
        for j, s in zip(row, row_scores):
            mark = "✓" if candidate_groups[j] == groups[clip] else "✗"
            lines.append(f"    {mark} {s:.3f}  {candidates[j]}")
    return lines
