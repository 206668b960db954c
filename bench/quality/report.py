"""Quality-bench report: the markdown section appended to bench/RESULTS.md and the two plots."""

import math
from pathlib import Path

from bench.quality.tasks import FIDELITY, METRIC


def hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _cell(s) -> str:
    return f"{s['score']:.1f} [{100 * s['budget']:.0f}%]"


def markdown(res: dict) -> str:
    fams, specs = res["config"]["families"], res["policies"]
    main = [s for s in specs if s["kind"] != "sweep"]
    R = res["results"]
    L = [
        f"## Quality: {res['model']} ({res['date']})",
        "",
        f"- device: {res['device']}, dtype {res['dtype']}; torch {res['torch']}, Python {res['python']}",
        f"- git commit: `{res['commit']}`; runtime {hms(res['runtime_s'])}",
        f"- command: `{res['command']}`",
        f"- model: `{res['model']}` ({res['model_path']})",
        f"- {res['config']['n']} samples per family, prompts ~{res['config']['prompt_tokens']} tokens "
        f"(mean per family below), seed {res['config']['seed']}; chat template: {res['chat']}",
    ]
    L += [f"- note: {x}" for x in res["notes"]]
    L += [
        "",
        "Each cell: score [mean KV budget kept]. Scores: text/code = top-1 agreement with the full cache "
        f"over {res['config']['fidelity_tokens']} teacher-forced real tokens; "
        "arithmetic = accuracy; "
        "summary = ROUGE-L F1 against the full-cache output.",
        "",
    ]
    L.append("| family (metric) | prompt tok | " + " | ".join(s["label"] for s in main) + " |")
    L.append("|---|---:|" + "---:|" * len(main))
    for f in fams:
        L.append(
            f"| {f} ({METRIC[f]}) | {res['prompt_tokens'][f]:.0f} | "
            + " | ".join(_cell(R[f][s["label"]]) for s in main)
            + " |"
        )
    L += [
        "",
        "Secondary metrics (fidelity: mean KL(full || pruned) nats/token and perplexity of the real "
        "continuation; generative: ROUGE-L vs the full-cache output / % of outputs identical to it):",
        "",
    ]
    L.append("| family | " + " | ".join(s["label"] for s in main) + " |")
    L.append("|---|" + "---:|" * len(main))
    for f in fams:
        if f in FIDELITY:
            cells = [f"KL {R[f][s['label']]['kl']:.3f}, ppl {R[f][s['label']]['ppl']:.2f}" for s in main]
        else:
            cells = [f"{R[f][s['label']]['agree']:.1f} / {R[f][s['label']]['same']:.0f}%" for s in main]
        L.append(f"| {f} | " + " | ".join(cells) + " |")
    sweep = sorted(
        (s for s in specs if s["name"] == "refreekv" and s["kind"] in ("threshold", "sweep")),
        key=lambda s: s["value"],
    )
    if sweep:
        L += [
            "",
            "ReFreeKV threshold sweep: score [mean budget] (budget range over samples):",
            "",
            "| family | " + " | ".join(f"T={s['value']:g}" for s in sweep) + " |",
            "|---|" + "---:|" * len(sweep),
        ]
        for f in fams:
            L.append(
                f"| {f} | "
                + " | ".join(
                    f"{_cell(R[f][s['label']])} ({100 * R[f][s['label']]['budget_min']:.0f}-"
                    f"{100 * R[f][s['label']]['budget_max']:.0f}%)"
                    for s in sweep
                )
                + " |"
            )
    L += [
        "",
        "Score relative to full cache (1.00 = equal; for summary the full cache is 100 by definition):",
        "",
        "| family | " + " | ".join(s["label"] for s in main if s["kind"] != "full") + " |",
        "|---|" + "---:|" * (len(main) - 1),
    ]
    for f in fams:
        L.append(
            f"| {f} | "
            + " | ".join(
                f"{R[f][s['label']]['rel']:.3f}" if R[f]["full"]["score"] else "n/a"
                for s in main
                if s["kind"] != "full"
            )
            + " |"
        )
    L += [
        "",
        "Attention mass of the last prompt query (mean over heads, sinks included) that fell on evicted "
        "keys, mean over layers (%):",
        "",
        "| family | " + " | ".join(s["label"] for s in main if s["kind"] != "full") + " |",
        "|---|" + "---:|" * (len(main) - 1),
    ]
    for f in fams:
        L.append(
            f"| {f} | "
            + " | ".join(f"{100 * R[f][s['label']]['evicted']:.1f}" for s in main if s["kind"] != "full")
            + " |"
        )
    rf = next((s for s in specs if s["name"] == "refreekv" and s["kind"] == "threshold"), None)
    if rf:
        L += [
            "",
            f"{rf['label']} per layer: kept % / evicted last-row attention mass % (mean over samples):",
            "",
            "| layer | " + " | ".join(fams) + " |",
            "|---:|" + "---:|" * len(fams),
        ]
        for i in range(len(R[fams[0]][rf["label"]]["kept_per_layer"])):
            L.append(
                f"| {i} | "
                + " | ".join(
                    f"{100 * R[f][rf['label']]['kept_per_layer'][i]:.0f} / "
                    f"{100 * R[f][rf['label']]['evicted_per_layer'][i]:.1f}"
                    for f in fams
                )
                + " |"
            )
    L += ["", "Plots: " + ", ".join(f"`{p}`" for p in res["plots"]), ""]
    return "\n".join(L) + "\n"


def plots(res: dict, out: Path, slug: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams, specs, R = res["config"]["families"], res["policies"], res["results"]
    ref = sorted(
        (s for s in specs if s["name"] == "refreekv" and s["kind"] in ("threshold", "sweep")),
        key=lambda s: s["value"],
    )
    paths = []
    if ref:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for f in fams:
            ax.plot([s["value"] for s in ref], [100 * R[f][s["label"]]["budget"] for s in ref], "o-", label=f)
        ax.set_xscale("log")
        ax.set_xlabel("ReFreeKV threshold T")
        ax.set_ylabel("mean KV budget kept (%)")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
        ax.legend(title="task family")
        ax.set_title(f"{res['model']}: budget chosen per family vs T", fontsize=10)
        fig.tight_layout()
        p = out / f"quality-{slug}-budget_vs_T.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)

    cols = min(3, len(fams))
    rows = math.ceil(len(fams) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.7 * rows), squeeze=False)
    fixed = sorted({s["name"] for s in specs if s["kind"] == "budget"})
    colours = dict(zip(fixed, ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown"]))
    for i, f in enumerate(fams):
        ax = axes[i // cols][i % cols]
        full = R[f]["full"]["score"]
        ax.axhline(full, color="grey", ls="--", lw=1, label="full cache")
        for name in fixed:
            pts = sorted(
                (s["value"], R[f][s["label"]]["budget"], R[f][s["label"]]["score"])
                for s in specs
                if s["name"] == name and s["kind"] == "budget"
            )
            xs = [100 * b for _, b, _ in pts] + [100.0]
            ys = [sc for _, _, sc in pts] + [full]
            ax.plot(xs, ys, "s-", color=colours[name], ms=4, lw=1.2, label=name)
        if ref:
            ax.plot(
                [100 * R[f][s["label"]]["budget"] for s in ref],
                [R[f][s["label"]]["score"] for s in ref],
                ":",
                color="tab:red",
                lw=1,
            )
            marked = []
            for s in sorted(ref, key=lambda s: s["kind"] != "threshold"):  # the main T first
                x, y = 100 * R[f][s["label"]]["budget"], R[f][s["label"]]["score"]
                main = s["kind"] == "threshold"
                ax.plot(
                    x,
                    y,
                    "*" if main else "o",
                    color="tab:red",
                    ms=13 if main else 5,
                    label="ReFreeKV T=%g" % s["value"] if main else None,
                    zorder=5,
                )
                if all(abs(x - mx) > 4 or abs(y - my) > 6 for mx, my in marked):  # label only distinct points
                    ax.annotate(
                        f"T={s['value']:g}",
                        (x, y),
                        textcoords="offset points",
                        xytext=(4, -11),
                        fontsize=7,
                        color="tab:red",
                    )
                    marked.append((x, y))
        for k, s in enumerate(v for v in specs if v["kind"] == "variant"):
            ax.plot(
                100 * R[f][s["label"]]["budget"],
                R[f][s["label"]]["score"],
                "Dv^<>ph"[k % 7],
                color="black",
                ms=6,
                label=s["label"],
                zorder=4,
            )
        ax.set_title(f"{f} ({METRIC.get(f, 'score')})", fontsize=10)
        ax.set_xlabel("mean KV budget kept (%)")
        ax.set_xlim(0, 105)
        # zoom on the data
        lo = max(0, 10 * math.floor((min(R[f][s["label"]]["score"] for s in specs) - 5) / 10))
        ax.set_ylim(lo, max(102, full * 1.02))
        ax.grid(alpha=0.3)
    for j in range(len(fams), rows * cols):
        axes[j // cols][j % cols].axis("off")
    h, lab = axes[0][0].get_legend_handles_labels()
    fig.legend(
        h,
        lab,
        loc="lower right" if len(fams) % cols else "upper center",
        fontsize=9,
        ncol=1 if len(fams) % cols else len(lab),
        bbox_to_anchor=None if len(fams) % cols else (0.5, 1.0),
    )
    fig.suptitle(
        f"{res['model']}: score vs KV budget (fixed budgets vs ReFreeKV)",
        fontsize=11,
        y=1.0 if len(fams) % cols else 1.06,
    )
    fig.tight_layout()
    p = out / f"quality-{slug}-score_vs_budget.png"
    fig.savefig(p, dpi=120, bbox_inches="tight")
    plt.close(fig)
    paths.append(p)
    return [str(x) for x in paths]
