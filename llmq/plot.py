"""report.png of `llmq compare`: three panels from the report's records.

    1. mean KLD vs bits per weight (log y), quantised files: the quality / size trade-off, with each engine's
       Pareto front as a dashed line through ringed points
    2. PPL vs bits per weight (± 1 s.e.), the reference PPL as a dotted line
    3. decode tok/s per file and engine (bars)

Colour and marker shape = producer (llmq method, llama.cpp, llama.cpp+imatrix); engine = fill: filled markers
and plain bars are llama.cpp, hollow markers and hatched bars the native runtime.
"""

from __future__ import annotations

from pathlib import Path

FIGSIZE = (19.0, 6.5)  # inches; at DPI this is the PNG's pixel size
DPI = 100
PRODUCER_STYLE = {  # producer -> (colour, marker)
    "llmq": ("black", "*"), "llmq rtn": ("tab:blue", "o"), "llmq rtn+imatrix": ("tab:cyan", "P"),
    "llmq awq": ("tab:olive", "D"), "llmq gptq": ("tab:green", "X"), "llmq awq+gptq": ("tab:purple", "s"),
    "llama.cpp": ("tab:red", "^"), "llama.cpp+imatrix": ("tab:orange", "v"),
}
HOLLOW_ENGINE = "native"


def _style(producer: str) -> tuple[str, str]:
    return PRODUCER_STYLE.get(producer, ("tab:gray", "o"))


def _scatter(ax, r: dict, y: float) -> None:
    colour, marker = _style(r["producer"])
    hollow = r["engine"] == HOLLOW_ENGINE
    ax.scatter(r["bpw"], y, marker=marker, s=80 if hollow else 50, zorder=3, facecolors="none" if hollow else colour,
               edgecolors=colour, linewidths=1.6 if hollow else 0.5)


def _label_types(ax, records: list[dict], key: str) -> None:
    """One label per file type, above its highest point (producers of the same type share the bpw)."""
    top: dict[tuple[str, float], float] = {}
    for r in records:
        k = (r["type"], round(r["bpw"], 2))
        top[k] = max(top.get(k, r[key]), r[key])
    for (ftype, bpw), y in top.items():
        ax.annotate(ftype, (bpw, y), textcoords="offset points", xytext=(0, 9), ha="center", fontsize=8)


def plot_report(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from .compare import FLOAT_TYPES

    records = report["records"]
    s = report["settings"]
    engines = list(dict.fromkeys(r["engine"] for r in records))
    producers = list(dict.fromkeys(r["producer"] for r in records))
    fig, (ax_kld, ax_ppl, ax_tps) = plt.subplots(1, 3, figsize=FIGSIZE, dpi=DPI,
                                                 gridspec_kw={"width_ratios": [1, 1, 1.2]})
    fig.suptitle(f"{Path(s['model']).name}: quant levels scored on {Path(s['text']).name} "
                 f"({s['n_tokens']} tokens in {s['chunks']} chunks of {s['ctx']}), reference {s['reference']}")

    quantised = [r for r in records if r["kld_mean"] is not None and r["type"] not in FLOAT_TYPES]
    for r in quantised:
        _scatter(ax_kld, r, r["kld_mean"])
    for engine in engines:
        front = sorted((r["bpw"], r["kld_mean"]) for r in quantised if r["engine"] == engine and r["pareto"])
        if front:
            ax_kld.plot(*zip(*front), color="black" if engine != HOLLOW_ENGINE else "grey", linestyle="--",
                        linewidth=1, zorder=1)
            ax_kld.scatter(*zip(*front), s=210, facecolors="none", edgecolors="black", linewidths=0.7, zorder=2)
    _label_types(ax_kld, quantised, "kld_mean")
    ax_kld.set_yscale("log")
    ax_kld.set_xlabel("bits per weight")
    ax_kld.set_ylabel("mean KL divergence to the reference (nats / token)")
    ax_kld.set_title("KLD vs size (lower left is better)")

    for r in records:
        _scatter(ax_ppl, r, r["ppl"])
        colour, _ = _style(r["producer"])
        ax_ppl.errorbar(r["bpw"], r["ppl"], yerr=r["ppl_err"], color=colour, alpha=0.35, zorder=2)
        if r["reference"]:
            ax_ppl.axhline(r["ppl"], color="grey", linestyle=":", linewidth=1)
    _label_types(ax_ppl, records, "ppl")
    ax_ppl.set_xlabel("bits per weight")
    ax_ppl.set_ylabel("perplexity (± 1 s.e.)")
    ax_ppl.set_title("PPL vs size (dotted: reference)")
    for ax in (ax_kld, ax_ppl):
        ax.grid(True, which="both", alpha=0.3)

    files = list(dict.fromkeys(r["file"] for r in records))
    width = 0.8 / max(1, len(engines))
    for i, engine in enumerate(engines):
        rows = {r["file"]: r for r in records if r["engine"] == engine}
        xs = [j + (i - (len(engines) - 1) / 2) * width for j, f in enumerate(files) if f in rows]
        ys = [rows[f]["decode_tps"] for f in files if f in rows]
        colours = [_style(rows[f]["producer"])[0] for f in files if f in rows]
        ax_tps.bar(xs, ys, width=width, color=colours, edgecolor="black", linewidth=0.5,
                   hatch="//" if engine == HOLLOW_ENGINE else None)
    ax_tps.set_xticks(range(len(files)))
    ax_tps.set_xticklabels([f.removesuffix(".gguf") for f in files], rotation=45, ha="right", fontsize=8)
    ax_tps.set_ylabel("decode tokens / s")
    ax_tps.set_title(f"decode speed ({s['threads']} threads)")
    ax_tps.grid(True, axis="y", alpha=0.3)

    reference_producers = {r["producer"] for r in records if r["reference"]}
    handles = [Line2D([], [], color=_style(p)[0], marker=_style(p)[1], linestyle="", markersize=8,
                      label=f"{p} F16 (reference)" if p in reference_producers else p) for p in producers]
    handles.append(Line2D([], [], color="black", marker="o", markerfacecolor="none", markersize=12, linestyle="--",
                          linewidth=1, label="Pareto front"))
    ax_kld.legend(handles=handles, fontsize=8, loc="upper right", title="producer", title_fontsize=8)
    engine_handles = [Patch(facecolor="white" if e == HOLLOW_ENGINE else "grey", edgecolor="black",
                            hatch="//" if e == HOLLOW_ENGINE else None,
                            label=f"{e} ({'hollow' if e == HOLLOW_ENGINE else 'filled'})") for e in engines]
    ax_ppl.legend(handles=engine_handles, fontsize=8, loc="upper right", title="engine", title_fontsize=8)
    ax_tps.legend(handles=engine_handles, fontsize=8, loc="upper right", title="engine", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
