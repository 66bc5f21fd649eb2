"""``python -m prefkern profile``: one training step of DPO, GRPO and on-policy distillation on a
small causal LM built from a config (random weights, no downloads), computed the way the
trainers do it (materialized logits, fp32 log-softmax) and with prefkern, with step time and
peak memory split by phase: forward (backbone and head), loss, backward.

Model: token embedding, ``layers`` pre-norm causal transformer blocks (torch's
nn.TransformerEncoderLayer), a final norm and an untied LM head (V, H). Presets: "micro" (the
tests), "tiny" (CPU),
"llama3-8b-head" (H 4096, V 128256, 2 layers) and "qwen2.5-7b-head" (H 3584, V 152064,
2 layers) on a GPU.
Memory: CUDA ``max_memory_allocated`` per phase; CPU the profiler's memory timeline of tensor
allocations (prefkern.bench.timing), both above what was allocated before the step (weights,
inputs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from prefkern.bench.timing import CPU_PEAK_METHOD


@dataclass(frozen=True)
class ModelConfig:
    hidden: int
    vocab: int
    layers: int
    heads: int
    batch: int  # sequences (DPO: pairs x 2)
    seq: int


PRESETS = {
    "micro": ModelConfig(hidden=32, vocab=4000, layers=1, heads=2, batch=4, seq=256),  # tests
    "tiny": ModelConfig(hidden=128, vocab=32000, layers=2, heads=4, batch=4, seq=256),
    "llama3-8b-head": ModelConfig(hidden=4096, vocab=128256, layers=2, heads=32, batch=8,
                                  seq=2048),
    "qwen2.5-7b-head": ModelConfig(hidden=3584, vocab=152064, layers=2, heads=28, batch=8,
                                   seq=2048),
}


class TinyCausalLM(torch.nn.Module):
    """Embedding, causal pre-norm blocks, final norm, LM head: ``forward`` gives the last
    hidden states (B, T, H); the head is ``self.lm_head``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed = torch.nn.Embedding(cfg.vocab, cfg.hidden)
        self.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(cfg.hidden, cfg.heads, 4 * cfg.hidden,
                                             dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(cfg.layers))
        self.norm = torch.nn.LayerNorm(cfg.hidden)
        self.lm_head = torch.nn.Linear(cfg.hidden, cfg.vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(ids.shape[1],
                                                                   device=ids.device)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.norm(x)


# ------------------------------------------------------------------------------ the steps

def _eager_logps(hidden, weight, targets, with_entropy=False):
    logits = hidden @ weight.T
    logp = logits.float().log_softmax(-1)
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    picked = torch.where(targets != -100, picked, 0)
    if not with_entropy:
        return picked, None
    return picked, -(logp.exp() * logp).sum(-1)


def _dpo(impl, hidden, weight, batch):
    import prefkern

    targets, ref_logps = batch["targets"], batch["ref_logps"]
    if impl == "prefkern":
        return lambda: prefkern.losses.linear_preference_loss(
            hidden, weight, targets, ref_logps=ref_logps, loss_type="sigmoid", beta=0.1)[0]
    logp, _ = _eager_logps(hidden, weight, targets)

    def loss():
        sums = logp.sum(-1)
        half = sums.shape[0] // 2
        return prefkern.losses.preference_loss(sums[:half], sums[half:], *ref_logps,
                                               loss_type="sigmoid", beta=0.1)[0]

    return loss


def _grpo(impl, hidden, weight, batch):
    import prefkern

    targets, old, adv = batch["targets"], batch["old_logps"], batch["advantages"]
    if impl == "prefkern":
        return lambda: prefkern.losses.linear_policy_loss(
            hidden, weight, targets, old, adv, loss_type="grpo", entropy_coef=0.01)[0]
    logp, entropy = _eager_logps(hidden, weight, targets, with_entropy=True)
    return lambda: prefkern.losses.policy_loss(logp, old, adv, targets != -100,
                                               loss_type="grpo", entropy=entropy,
                                               entropy_coef=0.01)[0]


def _distill(impl, hidden, weight, batch):
    import prefkern

    targets, t_hidden, t_weight = batch["targets"], batch["teacher_hidden"], batch["teacher_w"]
    if impl == "prefkern":
        return lambda: prefkern.losses.linear_distill_loss(
            hidden, weight, t_hidden, t_weight, targets, kind="forward_kl")[0]
    logits = (hidden @ weight.T).float()
    with torch.no_grad():
        t_logits = (t_hidden @ t_weight.T).float()

    def loss():
        a, b = logits.log_softmax(-1), t_logits.log_softmax(-1)
        per_token = (b.exp() * (b - a)).sum(-1)
        mask = targets != -100
        return torch.where(mask, per_token, 0).sum() / mask.sum().clamp(min=1)

    return loss


WORKLOADS = {"dpo": _dpo, "grpo": _grpo, "distill": _distill}


def _batch(cfg: ModelConfig, device, dtype):
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=gen).to(device)
    targets = ids[:, 1:].clone()
    targets[:, : cfg.seq // 4] = -100  # prompts
    b, t = targets.shape
    half = b // 2
    return ids[:, :-1], dict(
        targets=targets,
        ref_logps=(-torch.rand(half, generator=gen).to(device) * t * 3,
                   -torch.rand(half, generator=gen).to(device) * t * 3),
        old_logps=(-torch.rand(b, t, generator=gen) * 4).to(device),
        advantages=torch.randn(b, generator=gen).to(device),
        teacher_hidden=(torch.randn(b, t, cfg.hidden, generator=gen) * 0.5).to(device, dtype),
        teacher_w=(torch.randn(cfg.vocab, cfg.hidden, generator=gen) * cfg.hidden**-0.5).to(
            device, dtype))


class _Phases:
    """Wall time and (CUDA) peak memory of consecutive phases of one step."""

    def __init__(self, device):
        self.device, self.marks, self.peaks = device, [], {}

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self, base: int):
        self.base = base
        self.sync()
        self.marks.append(("start", time.perf_counter(), time.time_ns()))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def mark(self, name: str):
        self.sync()
        self.marks.append((name, time.perf_counter(), time.time_ns()))
        if self.device.type == "cuda":
            self.peaks[name] = torch.cuda.max_memory_allocated(self.device) - self.base
            torch.cuda.reset_peak_memory_stats(self.device)


def _step(model, ids, workload, impl, batch, phases):
    hidden = model(ids)
    weight = model.lm_head.weight
    make_loss = WORKLOADS[workload](impl, hidden, weight, batch)  # eager: the logits here
    phases.mark("forward")
    loss = make_loss()
    phases.mark("loss")
    loss.backward()
    phases.mark("backward")
    return loss


def _cpu_phase_peaks(timeline, marks) -> dict:
    """Peak live tensor bytes within each phase from the profiler's memory timeline."""
    events = sorted((t, getattr(a, "name", str(a)), size) for t, a, _, size in timeline)
    peaks, live, k = {}, 0, 0
    bounds = marks[1:]
    current = 0
    for name, _, end_ns in bounds:
        while k < len(events) and events[k][0] <= end_ns:
            _, action, size = events[k]
            if action == "CREATE":
                live += size
            elif action == "DESTROY":
                live -= size
            current = max(current, live)
            k += 1
        peaks[name] = current
        current = live
    return peaks


def _run_once(model, ids, workload, impl, batch, device, profiled: bool):
    model.zero_grad(set_to_none=True)
    phases = _Phases(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if not profiled:
        phases.start(base)
        loss = _step(model, ids, workload, impl, batch, phases)
        return phases, loss
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        phases.start(base)
        loss = _step(model, ids, workload, impl, batch, phases)
    phases.peaks = _cpu_phase_peaks(prof._memory_profile().timeline, phases.marks)
    return phases, loss


def run_profile(preset: str = "tiny", device=None, dtype=torch.float32, workloads=None
                ) -> list[dict]:
    """-> one row per (workload, implementation): ms and peak GiB per phase and for the
    step, from a second run after a warm-up (on CPU the memory comes from a third, profiled
    run: the profiler slows the many small ops of a chunked pass)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = PRESETS[preset]
    torch.manual_seed(0)
    model = TinyCausalLM(cfg).to(device, dtype)
    ids, batch = _batch(cfg, device, dtype)
    rows = []
    for workload in workloads or list(WORKLOADS):
        for impl in ("eager", "prefkern"):
            _run_once(model, ids, workload, impl, batch, device, False)  # warm-up
            phases, loss = _run_once(model, ids, workload, impl, batch, device, False)
            if device.type == "cpu":
                phases.peaks = _run_once(model, ids, workload, impl, batch, device,
                                         True)[0].peaks
            times = {name: (t - prev) * 1e3 for (name, t, _), (_, prev, _) in
                     zip(phases.marks[1:], phases.marks[:-1], strict=True)}
            gib = {name: value / 2**30 for name, value in phases.peaks.items()}
            rows.append(dict(workload=workload, impl=impl, loss=float(loss.detach()),
                             **{f"{k}_ms": v for k, v in times.items()},
                             step_ms=sum(times.values()),
                             **{f"{k}_peak_GiB": v for k, v in gib.items()},
                             peak_GiB=max(gib.values()) if gib else None))
    return rows


def table(rows) -> str:
    """The printed table (tabulate)."""
    from prefkern.bench.results import format_table

    header = ["workload", "impl", "fwd ms", "loss ms", "bwd ms", "step ms", "fwd GiB",
              "loss GiB", "bwd GiB", "peak GiB", "loss"]
    lines = [[r["workload"], r["impl"]]
             + [f"{r[k]:.1f}" for k in ("forward_ms", "loss_ms", "backward_ms", "step_ms")]
             + [f"{r.get(k, float('nan')):.3f}" for k in
                ("forward_peak_GiB", "loss_peak_GiB", "backward_peak_GiB", "peak_GiB")]
             + [f"{r['loss']:.4f}"] for r in rows]
    return format_table(lines, header, ["left"] * 2 + ["right"] * 9)


def plot(rows, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in ((axes[0], "peak_GiB", "peak memory above weights (GiB)"),
                              (axes[1], "step_ms", "step time (ms)")):
        for k, impl in enumerate(("eager", "prefkern")):
            values = [next(r[metric] for r in rows if r["workload"] == w and r["impl"] == impl)
                      for w in workloads]
            ax.bar([i + 0.4 * k for i in range(len(workloads))], values, width=0.4, label=impl)
        ax.set_xticks([i + 0.2 for i in range(len(workloads))], workloads)
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


MEMORY_METHOD = {"cuda": "torch.cuda.max_memory_allocated per phase", "cpu": CPU_PEAK_METHOD}
