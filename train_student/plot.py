"""PNG curves: a curve says more than the last number."""

from __future__ import annotations


def plot_curves(history: list[dict], evals: list[dict], path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [h["step"] for h in history]
    a.plot(steps, [h["loss"] for h in history], label="train loss", lw=1)
    a.plot(steps, [h["ce"] for h in history], label="train CE (next token)", lw=1, alpha=0.7)
    a.set_xlabel("step")
    a.set_ylabel("nats / token")
    a.legend()
    a.grid(alpha=0.3)
    if evals:
        es = [e["step"] for e in evals]
        each = evals[0].get("datasets", {})  # several held-out datasets: a curve for each
        for name in each:
            line, = b.plot(es, [e["datasets"][name]["ce"] for e in evals], "o-", lw=1,
                           label=f"{name}: CE")
            if evals[0]["datasets"][name].get("kl_topk") is not None:
                b.plot(es, [e["datasets"][name]["kl_topk"] for e in evals], "s--", lw=1,
                       color=line.get_color(), label=f"{name}: KL(teacher||student)")
        mean = " (token-weighted mean)" if each else ""
        b.plot(es, [e["ce"] for e in evals], "o-", color="k", label="held-out CE" + mean)
        if evals[0].get("kl_topk") is not None:  # (a student of another tokenizer: none)
            b.plot(es, [e["kl_topk"] for e in evals], "s-", color="0.4",
                   label="held-out KL(teacher||student)" + mean)
        if evals[0].get("bpb") is not None:
            b.plot(es, [e["bpb"] for e in evals], "^-", color="tab:green",
                   label="held-out bits per byte" + mean)
        b.set_xlabel("step")
        b.legend()
        b.grid(alpha=0.3)
    else:
        b.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
