"""
gapt.py: GPT-2 pretraining with Gated Phase Transitions (GAPT), in one file.

A minimal reproduction of "Memorization-Compression Cycles Improve Generalization"
(Fangyuan Yu, arXiv:2505.08727). The paper's idea: a language model should not only predict the
next token (low cross-entropy, CE) but also keep its internal representations compressed (low
matrix-based entropy, MBE). GAPT alternates between a memorization phase (train on CE) and a
compression phase (train on CE + lambda * MBE), switching on patience gates.

Run it:
    python gapt.py                                   # the paper's FineWeb run, one process
    python gapt.py config/shakespeare.py --mode=gapt # a config file plus overrides
    torchrun --nproc_per_node=8 gapt.py              # 8 GPUs, DDP
    python gapt.py --help                            # every key, its default and what it does

Read it top to bottom: the config, MBE, the model, the IBLM loss, the GAPT gate, the gradient
alignment probe, data, evaluation and the training loop, in the order things happen. Below
train() is what a first reading can skip: the author's test leak, config checks, processes,
checkpoints, data checks. The arithmetic answers are scored in prepare_data.py, beside their format.
"""

import ast
import ctypes
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

# the data format is checked, and the arithmetic answers scored, where the format is defined
from prepare_data import answer_ce_in_context, answer_scores, answer_sets, check_split, read_meta, stop

# -----------------------------------------------------------------------------
# Config
# Every hyperparameter is a plain value here. Override with a config file and/or --key=value:
#     python gapt.py config/arithmetic.py --mode=gapt --seed=2
# The defaults are the paper's FineWeb run with GPT-2 124M (about 1M tokens per step).
# -----------------------------------------------------------------------------
DEFAULTS = dict(
    mode="gapt",  # 'baseline' (CE only), 'iblm' (CE + lambda*MBE always) or 'gapt' (gated)
    # I/O
    out_dir="out",  # checkpoint ckpt.pt and log.jsonl go here
    eval_interval=250,  # evaluate and checkpoint every this many optimizer steps
    eval_iters=20,  # batches per split in each evaluation
    log_interval=10,  # print and log a training line every this many steps
    always_save_checkpoint=True,  # save at every evaluation, not only when val CE improves
    init_from="scratch",  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
    # data
    data_dir="data",  # prepare_data.py writes data_dir/<dataset>/{train,val}.bin + meta.json
    dataset="fineweb",  # name of the folder under data_dir
    batch_size=16,  # sequences per micro-batch per process
    block_size=1024,  # context length; must be a multiple of patch_size
    gradient_accumulation_steps=64,  # micro-batches per optimizer step, summed over all processes
    answer_eval_examples=1000,  # arithmetic only: examples per split for the answer CE in evaluations
    # model (GPT-2 124M)
    n_layer=12,  # transformer blocks
    n_head=12,  # attention heads
    n_embd=768,  # width of the residual stream
    vocab_size=50304,  # used when the dataset has no meta.json; 50257 rounded up to a multiple of 64
    dropout=0.0,  # 0 for pretraining, as in the paper
    bias=False,  # biases in Linear and LayerNorm layers
    # IBLM: CE + lambda * MBE_reg
    mbe_weight=1.0,  # lambda, the weight of the MBE term when it is on
    patch_size=8,  # tokens per patch for the patch MBE (max MBE = log patch_size)
    mbe_skip_first=2,  # blocks at the bottom not regularized (still measured and logged)
    mbe_skip_last=2,  # blocks at the top not regularized
    # GAPT gate (patience counts optimizer steps: scale it with the run length)
    delta_ce=0.01,  # a CE drop below the best by more than this counts as progress (nats)
    delta_mbe=0.002,  # an MBE drop below the best by more than this counts as progress
    patience_mem=125,  # steps without CE progress before compression starts
    patience_comp=125,  # steps without MBE progress before compression stops
    tau=0.1,  # compression stops when CE exceeds (1 + tau) * best CE of the phase
    comp_end="plateau",  # compression ends on an MBE plateau ('plateau'), or after patience_comp steps ('patience')
    gate_reads="train",  # the CE the gate reads: 'train', or 'test_ood' (the author's test leak, to measure it)
    # gradient alignment (the memorization-compression cycle)
    align_interval=50,  # measure cos(grad CE, grad MBE_reg) every this many steps; 0 = off
    # AdamW optimizer and learning-rate schedule
    learning_rate=6e-4,  # peak learning rate
    max_iters=1750,  # optimizer steps in the run
    warmup_iters=100,  # linear warmup steps
    lr_decay_iters=1750,  # cosine decay ends here (usually = max_iters)
    min_lr=6e-5,  # learning rate after the decay (learning_rate / 10)
    weight_decay=0.1,  # applied to 2-D weights only
    beta1=0.9,  # AdamW beta1
    beta2=0.95,  # AdamW beta2
    grad_clip=1.0,  # clip the global gradient norm to this; 0 = off
    # system
    device="auto",  # 'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype="auto",  # 'auto' (bfloat16 on CUDA, float32 elsewhere), 'bfloat16' or 'float32'
    compile=True,  # torch.compile the model (training steps only)
    threads=0,  # CPU threads per process; 0 = auto: the cores but one, shared by this machine's processes
    seed=1337,  # one seed for init, data order and dropout
)

# -----------------------------------------------------------------------------
# Matrix-based entropy (MBE): how spread out a set of token representations is.
# The Gram matrix K = Z Z^T of N tokens, normalized to unit trace, has eigenvalues p_i that
# sum to 1; their Renyi entropy is 0 when all tokens point the same way (fully compressed)
# and log N when they are orthogonal with equal norms (nothing shared).
# -----------------------------------------------------------------------------
MBE_EPS = 1e-5


def mbe(Z, alpha=2.0):
    """Matrix-based Renyi entropy S_alpha of each matrix Z[..., N, D] (rows = tokens), natural log.
    Always float32: in bf16 the Gram matrix entries lose the precision that log(tr^2/||K||^2)
    needs, so autocast is switched off here even inside a bf16 forward pass."""
    Z = Z.float()
    with torch.autocast(device_type=Z.device.type, enabled=False):
        K = Z @ Z.transpose(-1, -2)  # (..., N, N) Gram matrix
        trace = K.diagonal(dim1=-2, dim2=-1).sum(-1)
        if alpha == 2:
            # closed form: sum_i p_i^2 = ||K||_F^2 / tr(K)^2, no eigendecomposition needed
            entropy = 2 * torch.log(trace + MBE_EPS) - torch.log(K.square().sum((-2, -1)) + MBE_EPS)
        else:
            p = torch.linalg.eigvalsh(K / (trace[..., None, None] + MBE_EPS)).clamp(min=0)
            if alpha == 1:
                entropy = -torch.special.xlogy(p, p).sum(-1)
            else:
                entropy = torch.log((p ** alpha).sum(-1).clamp(min=torch.finfo(p.dtype).tiny)) / (1 - alpha)
            entropy = torch.where(trace > 0, entropy, 0.0)  # an all-zero matrix has no spread
    return entropy.clamp(min=0)


def patch_mbe(h, patch_size):
    """Mean alpha-2 MBE over non-overlapping patches of patch_size consecutive tokens of h (B, T, C).
    Patches keep the Gram matrices tiny (P x P): the cost is P / (12 * C) of a block's FLOPs."""
    B, T, C = h.shape
    if T % patch_size:
        raise ValueError(f"sequence length {T} is not a multiple of patch_size {patch_size}; "
                         f"choose block_size as a multiple of patch_size")
    patches = h.view(B, T // patch_size, patch_size, C)  # (B, T, C) -> (B, n_patches, P, C)
    return mbe(patches).mean()


# -----------------------------------------------------------------------------
# The GPT-2 model: learned positions, pre-LayerNorm blocks, GELU MLP, tied embedding and head.
# -----------------------------------------------------------------------------
@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = False
    patch_size: int = 8


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim): heads become a batch dimension for SDPA
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # SDPA picks the flash / memory-efficient kernel on GPU
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, n_head, T, head_dim) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer), one per residual add
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def trunk(self, idx, measure=None):
        """Final hidden states (B, T, C) and measure(h) of every block's output h, the residual stream
        after the block: the representation the paper compresses."""
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        measures = []
        for block in self.blocks:
            x = block(x)
            if measure is not None:
                measures.append(measure(x))
        return self.ln_f(x), measures

    def forward(self, idx, targets=None, measure=None):
        """(logits, ce, mbe_blocks): with targets, the mean next-token CE and each block's patch MBE, an
        (n_layer,) tensor (or what `measure` gives); without (generation), the last position's logits only."""
        if targets is None:
            return self.lm_head(self.trunk(idx)[0][:, [-1], :]), None, None
        x, measures = self.trunk(idx, measure or (lambda h: patch_mbe(h, self.config.patch_size)))
        logits = self.lm_head(x)
        # log-softmax in float32: summed over the vocabulary in bf16 (3 significant digits), CE would be
        # off by more than the 0.01 changes the GAPT gate watches
        ce = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))
        return logits, ce, torch.stack(measures)

    def all_logits(self, idx):
        """Logits at every position, without loss or MBE (for scoring answers)."""
        return self.lm_head(self.trunk(idx)[0])


# -----------------------------------------------------------------------------
# IBLM: Information Bottleneck Language Modelling, loss = CE + lambda * MBE_reg.
# MBE_reg is the mean MBE of the middle blocks; the three modes differ only in lambda per step.
# -----------------------------------------------------------------------------
def regularized_mbe(mbe_blocks, skip_first, skip_last):
    """Mean over the regularized blocks (all blocks stay logged; the ends are left free because
    the first blocks build token features and the last ones must expand them for the head)."""
    return mbe_blocks[skip_first:len(mbe_blocks) - skip_last].mean()


def iblm_loss(ce, mbe_reg, weight):
    """weight is 0 (no MBE gradient at all), a float, or a 0-d tensor set by the GAPT gate.
    The gate's weight is a tensor outside the compiled model, so a phase switch changes a value,
    never the graph: no recompile, and every parameter receives a gradient in both phases."""
    if isinstance(weight, (int, float)) and weight == 0:
        return ce
    return ce + weight * mbe_reg


# -----------------------------------------------------------------------------
# GAPT: the Gated Phase Transition. Memorize (CE only) until CE stops improving, then compress
# (CE + lambda * MBE) until MBE stops improving or CE gets worse by more than tau; repeat.
# Called once per optimizer step with the step's training CE and MBE_reg; returns the next phase:
#
#   init: phase = 1; s_m = s_c = 0; ce_min = mbe_min = +inf
#   step(ce, mbe):
#     if phase == 1:                                  # memorization
#         s_m = 0 if ce < ce_min - delta_ce else s_m + 1
#         ce_min = min(ce_min, ce)
#         if s_m >= patience_mem:                     # CE has plateaued: compress
#             phase, s_c, ce_min, mbe_min = 2, 0, +inf, +inf
#     else:                                           # compression
#         ce_min = min(ce_min, ce)
#         if ce > (1 + tau) * ce_min:                 # CE got worse: memorize again
#             phase, s_m = 1, 0
#         else:
#             s_c = 0 if mbe < mbe_min - delta_mbe else s_c + 1
#             mbe_min = min(mbe_min, mbe)
#             if s_c >= patience_comp:                # MBE has plateaued: memorize again
#                 phase, s_m = 1, 0
#     return phase
#
# comp_end='patience' is the rule as the author's code ran it: MBE progress is never tested, so
# every compression phase lasts patience_comp steps unless the tau rule ends it sooner (and the
# run's first step counts as no CE progress).
# -----------------------------------------------------------------------------
class GAPT:
    """The rule above, to the letter. Its state lives in 0-d tensors on `device` and step() returns
    the next phase as a tensor, so that calling it every optimizer step on GPU losses never makes
    the CPU wait for the GPU; read `phase` (an int) only when you need it on the host."""

    def __init__(self, delta_ce=0.01, delta_mbe=0.002, patience_mem=125, patience_comp=125, tau=0.1,
                 comp_end="plateau", device="cpu"):
        self.delta_ce, self.delta_mbe, self.tau, self.comp_end = delta_ce, delta_mbe, tau, comp_end
        self.patience_mem, self.patience_comp = patience_mem, patience_comp
        self.device = device
        self.load_state_dict(dict(phase=1, s_m=0, s_c=0, ce_min=math.inf, mbe_min=math.inf))

    @property
    def phase(self):
        return int(self.state["phase"])

    def step(self, ce, mbe):
        """Each branch of the rule computes its whole outcome, then one where() selects: an `if` on a
        GPU value would make the CPU wait for it, a where() never does."""
        s, where = self.state, torch.where
        # float64 so that the comparisons with delta are those of the rule in Python floats
        ce, mbe = (torch.as_tensor(v, dtype=torch.float64, device=self.device).detach() for v in (ce, mbe))
        # what both phases read: the best CE so far, and progress against the best CE and MBE
        ce_min = torch.minimum(s["ce_min"], ce)
        ce_progress, mbe_progress = ce < s["ce_min"] - self.delta_ce, mbe < s["mbe_min"] - self.delta_mbe
        # the author's executed gate (comp_end='patience'): MBE progress is never tested, and the run's
        # first step, with no best CE yet, counts as no CE progress (a Python setting: no sync)
        if self.comp_end == "patience":
            ce_progress, mbe_progress = ce_progress & s["ce_min"].isfinite(), torch.zeros_like(mbe_progress)

        # phase 1, memorization: count steps without CE progress; at patience_mem, compress
        s_m = where(ce_progress, 0, s["s_m"] + 1)
        ce_plateau = s_m >= self.patience_mem
        memorize = dict(phase=where(ce_plateau, 2, 1), s_m=s_m, s_c=where(ce_plateau, 0, s["s_c"]),
                        ce_min=where(ce_plateau, math.inf, ce_min), mbe_min=where(ce_plateau, math.inf, s["mbe_min"]))

        # phase 2, compression: memorize again when CE rises above (1 + tau) * its best, or MBE has
        # made no progress for patience_comp steps
        ce_spike = ce > (1 + self.tau) * ce_min
        s_c = where(mbe_progress, 0, s["s_c"] + 1)
        stop_compressing = ce_spike | (s_c >= self.patience_comp)
        compress = dict(phase=where(stop_compressing, 1, 2), s_m=where(stop_compressing, 0, s["s_m"]),
                        s_c=where(ce_spike, s["s_c"], s_c), ce_min=ce_min,
                        mbe_min=where(ce_spike, s["mbe_min"], torch.minimum(s["mbe_min"], mbe)))

        self.state = {k: where(s["phase"] == 1, memorize[k], compress[k]) for k in s}
        return self.state["phase"]

    def state_dict(self):
        return {k: v.item() for k, v in self.state.items()}

    def load_state_dict(self, state):
        dtypes = dict(phase=torch.int64, s_m=torch.int64, s_c=torch.int64, ce_min=torch.float64, mbe_min=torch.float64)
        self.state = {k: torch.tensor(state[k], dtype=dtypes[k], device=self.device) for k in dtypes}


def phase_and_weight(mode, mbe_weight, gate):
    """The next step's phase and lambda, decided here only: baseline memorizes (phase 1, no MBE term), iblm
    compresses (phase 2), gapt follows its gate, whose phase and lambda stay device tensors (no sync)."""
    if mode == "baseline":
        return 1, 0.0
    if mode == "iblm":
        return 2, mbe_weight
    return gate.state["phase"], mbe_weight * (gate.state["phase"] == 2)


# -----------------------------------------------------------------------------
# Gradient alignment: the memorization-compression cycle.
# cos(grad CE, grad MBE_reg) > 0: a CE descent step also lowers MBE (compression);
# cos < 0: lowering CE raises MBE (memorization). In plain CE training its sign flips over time.
# -----------------------------------------------------------------------------
def cosine(a_parts, b_parts):
    dot = sum((a * b).sum() for a, b in zip(a_parts, b_parts))
    norm_a = torch.sqrt(sum(a.square().sum() for a in a_parts))
    norm_b = torch.sqrt(sum(b.square().sum() for b in b_parts))
    return dot / (norm_a * norm_b)


def gradient_alignment(model, X, Y, skip_first, skip_last, autocast_ctx):
    """Global and per-block cosines on one micro-batch. autograd.grad returns the gradients instead of
    filling .grad and runs none of DDP's hooks (the plain module's forward), so no rank starts a collective
    the others never join; the forked RNG leaves training exactly as without it. Blocks above the
    regularized ones get no MBE gradient: their cosine is None."""
    params = [p for p in model.parameters() if p.requires_grad]
    devices = [X.device] if X.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        with autocast_ctx:
            _, ce, mbe_blocks = model(X, Y)
        mbe_reg = regularized_mbe(mbe_blocks, skip_first, skip_last)
        g_ce = torch.autograd.grad(ce, params, retain_graph=True)
        g_mbe = torch.autograd.grad(mbe_reg, params, allow_unused=True, materialize_grads=True)
    index = {id(p): i for i, p in enumerate(params)}
    per_block = []
    for block in model.blocks:
        ids = [index[id(p)] for p in block.parameters()]
        a, b = [g_ce[i].float() for i in ids], [g_mbe[i].float() for i in ids]
        per_block.append(cosine(a, b) if any(x.any() for x in b) else None)
    return cosine([g.float() for g in g_ce], [g.float() for g in g_mbe]), per_block


# -----------------------------------------------------------------------------
# Data: random windows from data_dir/<dataset>/<split>.bin (uint16 tokens, see prepare_data.py).
# -----------------------------------------------------------------------------
def draw_step_windows(generator, n_tokens, micro_steps, batch_size, block_size, rank, world_size):
    """Start positions (micro_steps, batch_size) of this rank's windows for one optimizer step. Every rank
    draws the whole step's windows from one generator and keeps its own rows: the run is the same as a
    single process with the same global batch (tested), whatever the number of processes."""
    starts = torch.randint(n_tokens - block_size, (micro_steps * world_size, batch_size), generator=generator)
    return starts[rank::world_size].numpy()  # host indices: reading them never waits for a GPU


def load_windows(path, starts, block_size, device):
    """x, y (len(starts), block_size) int64 windows; y is x shifted by one token."""
    # a fresh memmap per batch: numpy keeps a long-lived memmap's pages referenced and leaks memory
    data = np.memmap(path, dtype=np.uint16, mode="r")
    rows = np.stack([data[s:s + block_size + 1] for s in starts]).astype(np.int64)
    xy = torch.from_numpy(rows)
    x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
    if device.type == "cuda":
        # pinned memory lets the copy run asynchronously while the GPU is still busy
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# Evaluation: validation CE and per-block MBE, averaged over ranks; on arithmetic, the answer CE
# (the paper's out-of-distribution metric) of each example alone and in context, scored in prepare_data.py.
# -----------------------------------------------------------------------------
def patch_spectrum(h, patch_size):
    """What a low MBE is made of, per block, as means over patches: [MBE; MBE of the patch with its
    mean token removed; the largest eigenvalue's share of the trace; the alpha-1 (von Neumann) MBE].
    Alpha-2 MBE is dominated by the largest eigenvalue, so it falls both when the tokens use fewer
    directions and when they all share one direction grown large: the other three tell which."""
    B, T, C = h.shape
    patches = h.float().view(B, T // patch_size, patch_size, C)  # (B, n_patches, P, C)
    K = patches @ patches.transpose(-1, -2)
    # P x P eigenproblems are cheap anywhere; MPS has no eigvalsh, so they go to the CPU there
    eigenvalues = torch.linalg.eigvalsh(K.cpu() if K.device.type == "mps" else K).to(K.device).clamp(min=0)
    p = eigenvalues / (eigenvalues.sum(-1, keepdim=True) + MBE_EPS)  # ascending
    centred = patches - patches.mean(-2, keepdim=True)
    alpha1 = -torch.special.xlogy(p, p).sum(-1)
    return torch.stack([mbe(patches).mean(), mbe(centred).mean(), p[..., -1].mean(), alpha1.mean()])


SPECTRUM_KEYS = ("mbe", "mbe_centred", "top_share", "mbe_alpha1")  # logged per block: val_<key>_blocks


@torch.no_grad()
def evaluate(model, cfg, paths, answer_sets, autocast_ctx, dist_info):
    """The same windows at every evaluation (a fixed generator per rank), so that evaluations
    compare like with like, and no draw from the training data stream."""
    model.eval()
    results = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(cfg.seed + 1 + dist_info.rank)
        n_tokens = os.path.getsize(paths[split]) // 2
        sums = torch.zeros(1 + cfg.n_layer * len(SPECTRUM_KEYS), device=dist_info.device)  # [ce, spectra]
        for _ in range(cfg.eval_iters):
            starts = torch.randint(n_tokens - cfg.block_size, (cfg.batch_size,), generator=gen).numpy()
            x, y = load_windows(paths[split], starts, cfg.block_size, dist_info.device)
            with autocast_ctx:
                _, ce, spectra = model(x, y, measure=lambda h: patch_spectrum(h, cfg.patch_size))  # (n_layer, 4)
            sums += torch.cat([ce.view(1), spectra.flatten()])
        means = all_reduce_mean(sums / cfg.eval_iters, dist_info)
        results[f"{split}_ce"] = means[0].item()
        if split == "val":
            spectra = means[1:].view(cfg.n_layer, len(SPECTRUM_KEYS))
            results["val_mbe"] = regularized_mbe(spectra[:, 0], cfg.mbe_skip_first, cfg.mbe_skip_last).item()
            results["val_mbe_all"] = spectra[:, 0].mean().item()  # the paper's comparison averages all blocks
            for key, column in zip(SPECTRUM_KEYS, spectra.T.tolist()):
                results[f"val_{key}_blocks"] = [round(v, 5) for v in column]
    if answer_sets:  # the product's digits, by the vocabulary: the author's format also writes a space after '='
        digits = {i for i, token in enumerate(read_meta(cfg.data_dir, cfg.dataset)["tokenizer"]) if token.isdigit()}
    for split, (examples, sep_token) in answer_sets.items():
        # every rank scores the same fixed examples, so there is nothing to average
        with autocast_ctx:
            scores = answer_scores(model, examples, sep_token, digits, dist_info.device)
            in_context = answer_ce_in_context(model, examples, sep_token, dist_info.device, cfg.block_size)
        results.update({f"{split}_{key}": value for key, value in scores.items()})  # val_answer_ce, val_end_ce, ...
        if math.isfinite(in_context):  # NaN: the window is too short to hold two of the longest examples
            results[f"{split}_answer_ce_in_context"] = in_context
    model.train()
    return results


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------
def learning_rate(it, cfg):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def train_step(model, optimizer, starts, weight, cfg, train_path, autocast_ctx, dist_info):
    """One optimizer step over this rank's micro-batches (starts: (micro_steps, batch_size)); returns
    [ce, mbe_reg] averaged over micro-batches and ranks, on the device (unpacking them reads nothing back)."""
    micro_steps = len(starts)
    stats = torch.zeros(2, device=dist_info.device)
    X, Y = load_windows(train_path, starts[0], cfg.block_size, dist_info.device)
    for micro_step in range(micro_steps):
        if dist_info.ddp:
            # DDP decides during the forward pass whether the coming backward all-reduces gradients,
            # so the flag is set before it: only the last micro-step pays for communication
            model.require_backward_grad_sync = micro_step == micro_steps - 1
        with autocast_ctx:
            _, ce, mbe_blocks = model(X, Y)
        mbe_reg = regularized_mbe(mbe_blocks, cfg.mbe_skip_first, cfg.mbe_skip_last)
        loss = iblm_loss(ce, mbe_reg, weight) / micro_steps  # the mean over micro-batches, not the sum
        if micro_step + 1 < micro_steps:  # read the next batch from disk while the GPU works
            X, Y = load_windows(train_path, starts[micro_step + 1], cfg.block_size, dist_info.device)
        loss.backward()
        stats += torch.stack([ce.detach(), mbe_reg.detach()])
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # the gate sees the all-reduced losses: every rank takes the same decision, always
    return all_reduce_mean(stats / micro_steps, dist_info)


def measure_alignment(model, starts, cfg, train_path, autocast_ctx, dist_info):
    """The alignment on this step's first micro-batch, averaged over ranks (NaN marks None)."""
    X, Y = load_windows(train_path, starts, cfg.block_size, dist_info.device)
    overall, per_block = gradient_alignment(model, X, Y, cfg.mbe_skip_first, cfg.mbe_skip_last, autocast_ctx)
    values = torch.stack([overall] + [torch.tensor(math.nan, device=X.device) if c is None else c for c in per_block])
    values = all_reduce_mean(values.float(), dist_info).tolist()
    return dict(align_cos=values[0], align_cos_blocks=[None if math.isnan(v) else round(v, 5) for v in values[1:]])


def train(cfg):
    dist_info = setup_distributed(cfg)
    set_threads(cfg.threads)
    device = dist_info.device
    if device.type == "cpu":
        keep_freed_memory()
    micro_steps = micro_steps_per_process(cfg, dist_info)

    # everything is checked before anything is written: the checkpoint, the data, out_dir
    checkpoint = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), device) if cfg.init_from == "resume" else None
    if checkpoint is not None:  # resuming: the architecture is the checkpoint's, whatever the command line says
        cfg.update({key: checkpoint["config"][key] for key in MODEL_KEYS})
        if dist_info.master:
            say_what_changed_since(checkpoint, cfg)
    meta, paths, answer_sets = check_data(cfg)
    if dist_info.master:
        check_out_dir(cfg)
    if checkpoint is None:  # a new model is sized by its dataset's vocabulary
        cfg.vocab_size = model_vocab_size(cfg, meta)

    # the model and its optimizer: the same initialization on every rank
    if device.type == "cuda":  # TF32 for any float32 matmul left outside autocast
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    model = make_model(cfg).to(device)
    optimizer = make_optimizer(model, cfg, device)
    # the GAPT gate, where the losses it reads are (on MPS, which has no float64, the CPU)
    gate = GAPT(delta_ce=cfg.delta_ce, delta_mbe=cfg.delta_mbe, patience_mem=cfg.patience_mem,
                patience_comp=cfg.patience_comp, tau=cfg.tau, comp_end=cfg.comp_end,
                device=device if device.type == "cuda" else torch.device("cpu"))
    data_gen = torch.Generator().manual_seed(cfg.seed)  # the same on every rank: see draw_step_windows
    torch.manual_seed(cfg.seed + dist_info.rank)  # dropout: a stream of its own on each rank
    # resuming: the checkpoint's weights, optimizer, gate and RNG streams replace the fresh ones
    iter_num, best_val_loss, resumed_phase = restore_run(checkpoint, model, optimizer, gate, data_gen, dist_info)
    autocast_ctx = autocast_context(cfg, device)
    log_path = start_log(cfg, dist_info, iter_num, model, micro_steps)
    # the training graph: compiled once, and in DDP under torchrun; evaluation and the probe use `model`
    train_model = torch.compile(model) if cfg.compile else model
    if dist_info.ddp:
        train_model = DDP(train_model, device_ids=[dist_info.local_rank] if device.type == "cuda" else None)

    n_train = os.path.getsize(paths["train"]) // 2
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    flops_step, peak = flops_per_token(model) * tokens_per_step, peak_flops(device)
    history = []  # (iter, lr, ce, mbe_reg, phase) of the steps since the last log, still on the device
    phases = []  # the phase of every step, for the caller
    t_log = time.time()
    while iter_num < cfg.max_iters:
        # this step's learning rate and data (every rank draws the same windows and keeps its share)
        lr = learning_rate(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = draw_step_windows(data_gen, n_train, micro_steps, cfg.batch_size, cfg.block_size,
                                   dist_info.rank, dist_info.world_size)

        # the cycle probe: cos(grad CE, grad MBE_reg) on this step's first micro-batch, before the update
        if cfg.align_interval and iter_num % cfg.align_interval == 0:
            row = dict(iter=iter_num, **measure_alignment(model, starts[0], cfg, paths["train"], autocast_ctx,
                                                          dist_info))  # sync: its cosines are read back
            if dist_info.master:
                append_jsonl(log_path, row)

        # one optimizer step with this step's lambda, then the gate decides the next step's phase
        phase, weight = phase_and_weight(cfg.mode, cfg.mbe_weight, gate)
        ce, mbe_reg = train_step(train_model, optimizer, starts, weight, cfg, paths["train"], autocast_ctx, dist_info)
        if cfg.mode == "gapt":  # gate_reads='test_ood' feeds it a test loss instead: the leak, measured
            gate_ce = (ce if cfg.gate_reads == "train"
                       else leaked_test_ce(model, iter_num, cfg, paths, autocast_ctx, dist_info))
            gate.step(gate_ce, mbe_reg)
        iter_num += 1
        history.append((iter_num, lr, ce, mbe_reg, phase))  # still on the device: nothing has waited for it

        # logging, every log_interval steps. The loop's host-device syncs are here (the steps since the
        # last log, read back at once), in the alignment probe and in the evaluation; none in between.
        if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
            row = read_back_steps(history, phases, resumed_phase, cfg, log_path, dist_info)  # sync
            dt = (time.time() - t_log) / len(history)
            row.update(ms_per_step=round(1000 * dt, 1), tok_per_s=round(tokens_per_step / dt))
            if peak:
                row["mfu"] = round(flops_step / dt / (peak * dist_info.world_size), 4)
            if dist_info.master:
                append_jsonl(log_path, row)
                print(format_row(row))
            history, t_log = [], time.time()

        # evaluation and checkpoint (the RNG states of every rank go in, so resuming is exact)
        if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
            results = evaluate(model, cfg, paths, answer_sets, autocast_ctx, dist_info)  # sync: its .item()s
            stop_if_not_finite(results["val_ce"], "the validation loss", iter_num, cfg)
            stop_if_not_finite(ce.item(), "the training loss", iter_num, cfg)  # sync
            rngs = rng_states(data_gen, dist_info)  # a collective: all ranks
            improved = results["val_ce"] < best_val_loss
            best_val_loss = min(best_val_loss, results["val_ce"])
            if dist_info.master:
                row = dict(iter=iter_num, event="eval", **results)
                append_jsonl(log_path, row)
                print(format_row(row))
                if improved or cfg.always_save_checkpoint:
                    save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), dict(
                        model=model.state_dict(), optimizer=optimizer.state_dict(), config=dict(cfg),
                        iter_num=iter_num, best_val_loss=best_val_loss, gapt=gate.state_dict(), rng=rngs,
                        phase=int(phase)))  # the phase of the step just taken (a sync, like the evaluation's)
                if improved and cfg.always_save_checkpoint:  # ckpt.pt is the latest; a run that then
                    keep_best_checkpoint(cfg.out_dir)  # diverges still leaves its best model in best.pt
            t_log = time.time()  # evaluation time is not training time
    del train_model  # DDP holds the process group, which must go now (see shutdown_distributed)
    shutdown_distributed(dist_info)
    return dict(model=model, gate=gate, phases=phases)


# =============================================================================
# Plumbing: everything below supports train() and can be skipped on a first reading.
# =============================================================================

# -----------------------------------------------------------------------------
# The author's test leak, measured: the gate fed a test_ood loss (gate_reads='test_ood')
# -----------------------------------------------------------------------------
@torch.no_grad()
def leaked_test_ce(model, iter_num, cfg, paths, autocast_ctx, dist_info):
    """The CE of one batch of test_ood windows, drawn by step number (so resuming draws the same):
    what the gate of some of the author's runs read. For measuring that leak only."""
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_000 + iter_num)
    starts = torch.randint(os.path.getsize(paths["test_ood"]) // 2 - cfg.block_size, (cfg.batch_size,),
                           generator=generator).numpy()
    X, Y = load_windows(paths["test_ood"], starts, cfg.block_size, dist_info.device)
    model.eval()
    with autocast_ctx:
        _, ce, _ = model(X, Y)
    model.train()
    return all_reduce_mean(ce.float(), dist_info)


# -----------------------------------------------------------------------------
# Config parsing and checks: every bad value stops the run before anything is written
# -----------------------------------------------------------------------------
def rule(check, requirement, keys):
    return {key: (check, requirement) for key in keys}


RULES = {  # what each key must be (types are checked against DEFAULTS)
    **rule(lambda v: v > 0, "positive", ("batch_size", "block_size", "gradient_accumulation_steps", "n_layer",
                                          "n_head", "n_embd", "patch_size", "max_iters", "eval_iters", "log_interval",
                                          "eval_interval", "answer_eval_examples", "learning_rate", "vocab_size")),
    **rule(lambda v: v >= 0, ">= 0", ("mbe_weight", "mbe_skip_first", "mbe_skip_last", "delta_ce", "delta_mbe",
                                       "patience_mem", "patience_comp", "tau", "align_interval", "warmup_iters",
                                       "lr_decay_iters", "min_lr", "weight_decay", "grad_clip", "threads")),
    **rule(lambda v: 0 <= v < 1, "in [0, 1)", ("dropout", "beta1", "beta2")),
    **rule(lambda v: v != "", "a non-empty path or name", ("out_dir", "data_dir", "dataset")),
    **rule(lambda v: v in ("baseline", "iblm", "gapt"), "one of baseline, iblm, gapt", ("mode",)),
    **rule(lambda v: v in ("scratch", "resume"), "one of scratch, resume", ("init_from",)),
    **rule(lambda v: v in ("plateau", "patience"), "one of plateau, patience", ("comp_end",)),
    **rule(lambda v: v in ("train", "test_ood"), "one of train, test_ood", ("gate_reads",)),
    **rule(lambda v: v in ("auto", "bfloat16", "float32"), "one of auto, bfloat16, float32", ("dtype",)),
}


class Config(dict):
    """The run's settings: a dict whose keys also read as attributes (cfg.batch_size)."""

    def __getattr__(self, key):
        if key in self:
            return self[key]
        raise AttributeError(key)

    __setattr__ = dict.__setitem__


def parse_value(key, text, default):
    """A command-line value is a Python literal (3, 1e-4, True) of its default's type; strings need no quotes."""
    if isinstance(default, str):
        return text
    try:
        return ast.literal_eval(text.capitalize() if isinstance(default, bool) else text)
    except (ValueError, SyntaxError):
        return text  # check_type reports the mismatch with the key's name


def check_type(key, value, default):
    if type(default) is float and type(value) is int:
        return float(value)  # 1 where 1.0 is expected
    if type(value) is not type(default):
        stop(f"{key} must be {type(default).__name__} (like the default {default!r}), got {value!r}")
    return value


def read_config_file(path):
    """A config file is Python assignments (batch_size = 8); names starting with _ are its own."""
    if not os.path.isfile(path):
        stop(f"config file {path!r} not found (arguments are config files or --key=value)")
    namespace = {}
    try:
        with open(path, encoding="utf-8") as f:
            exec(f.read(), {}, namespace)
    except Exception as e:  # a syntax error, a name error, not UTF-8: whatever the file does wrong
        stop(f"config file {path!r} could not be read ({type(e).__name__}: {e}); "
             f"it must be Python assignments such as: batch_size = 8")
    return {k: v for k, v in namespace.items() if not k.startswith("_")}


def parse_config(argv, defaults, rules=None):
    """Defaults, then config files in order, then --key=value; unknown keys, wrong types and values that
    break a rule ({key: (check, requirement)}, like RULES) are errors. sample.py and experiments/ parse
    their own defaults and rules with it too."""
    if "--help" in argv or "-h" in argv:
        print_help(defaults)
    cfg = Config(defaults)
    for arg in argv:
        if arg.startswith("--"):
            key, has_value, text = arg[2:].partition("=")
            if not has_value:
                stop(f"write overrides as --key=value, got {arg!r}")
            updates = {key: parse_value(key, text, defaults.get(key, ""))}
        else:
            updates = read_config_file(arg)
        for key, value in updates.items():
            if key not in defaults:
                stop(f"unknown config key {key!r} (the keys are the defaults at the top of the script)")
            cfg[key] = check_type(key, value, defaults[key])
    for key, (check, requirement) in (rules or {}).items():
        if not check(cfg[key]):
            stop(f"{key} must be {requirement}, got {cfg[key]!r}")
    return cfg


def print_help(defaults):
    """Every key with its default and the comment beside it where it is defined."""
    comments = {}
    for path in (getattr(sys.modules["__main__"], "__file__", __file__), __file__):  # the program's own first
        for line in open(path):
            key, _, rest = line.strip().partition("=")
            if key.isidentifier() and "  # " in rest:
                comments.setdefault(key, rest.split("  # ", 1)[1])
    print(f"usage: {os.path.basename(sys.argv[0])} [config_file.py ...] [--key=value ...]\n")
    for key, default in defaults.items():
        print(f"  --{key}={default!r:<12} {comments.get(key, '')}")
    raise SystemExit(0)


def load_config(argv):
    cfg = parse_config(argv, DEFAULTS, RULES)
    validate_config(cfg)
    return cfg


def validate_config(cfg):
    """What no single key's rule can say: how the keys must fit together."""
    check_device(cfg.device)
    if cfg.block_size % cfg.patch_size:
        stop(f"block_size ({cfg.block_size}) must be a multiple of patch_size ({cfg.patch_size}): "
             f"the patch MBE cuts each sequence into whole patches")
    if cfg.n_embd % cfg.n_head:
        stop(f"n_embd ({cfg.n_embd}) must be a multiple of n_head ({cfg.n_head})")
    if cfg.mbe_skip_first + cfg.mbe_skip_last >= cfg.n_layer:
        stop(f"mbe_skip_first + mbe_skip_last ({cfg.mbe_skip_first} + {cfg.mbe_skip_last}) "
             f"must leave at least one of the {cfg.n_layer} blocks to regularize")


# -----------------------------------------------------------------------------
# Processes and devices: one process, or one per GPU (or CPU worker) under torchrun
# -----------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int  # global rank of this process; rank 0 (master) logs and writes checkpoints
    local_rank: int  # rank on this node: which GPU to use
    world_size: int  # number of processes
    device: torch.device
    held: list = field(default_factory=list)  # tensors a gloo worker may still hold (see shutdown_distributed)
    master = property(lambda self: self.rank == 0)
    ddp = property(lambda self: self.world_size > 1)

    def hold(self, tensor):
        """Keep a Python reference to a collective's tensor for as long as anything else references it."""
        self.held = [t for t in self.held if t._use_count() > 1] + [tensor]


def check_device(name, local_rank=0):
    """A device this build of torch has; 'auto' and 'cuda' mean this process's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    except RuntimeError:
        stop(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        stop(f"device={name!r} but this torch has no CUDA device; use --device=cpu (or auto)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        stop(f"device={name!r} but MPS is not available here; use --device=cpu (or auto)")
    return device


def setup_distributed(cfg):
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a single process."""
    if "RANK" not in os.environ:
        return Dist(0, 0, 1, check_device(cfg.device))
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = check_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # torch._dynamo (imported by torch.compile and by DDP) keeps references to a process group that
    # exists when it is first imported, and the group would then outlive shutdown_distributed()
    import torch._dynamo  # noqa: F401
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, local_rank, world_size, device)


def shutdown_distributed(dist_info):
    """Destroy the process group while Python is fully alive. A gloo worker drops its reference to a
    collective's tensors after wait() has returned; if Python has freed them, the worker needs the GIL:
    at exit that aborts (SIGABRT), and torch 2.4 destroys the group holding the GIL while waiting for
    the workers, a deadlock. Hence every collective's tensor is held (Dist.hold) until the group is gone.
    The caller drops DDP first: DDP holds the group."""
    if dist_info.ddp:
        dist.destroy_process_group()
        dist_info.held.clear()


def set_threads(threads):
    """torch's thread per core makes a CPU run crawl once anything else runs (experiments/README.md,
    "Threads"): auto leaves one core to the machine; torchrun's OMP_NUM_THREADS, or yours, wins."""
    if threads == 0:
        if "OMP_NUM_THREADS" in os.environ:
            return
        threads = max(1, ((os.cpu_count() or 1) - 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    torch.set_num_threads(threads)


def keep_freed_memory():
    """A CPU step frees its batch x block x vocab tensors (400 MB each at 16 x 128 tokens of GPT-2) and
    allocates them again; glibc returns such blocks to the kernel, which zeroes fresh pages for the next
    step: a third of its CPU time. Kept in the heap they are reused; the process keeps its peak memory."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform.startswith("linux") else None
    if mallopt is not None:  # glibc (musl's does nothing)
        mallopt(-4, 0)  # M_MMAP_MAX = 0: no block gets a mapping of its own (unless the heap cannot grow)
        mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: the heap's free top is never given back


def micro_steps_per_process(cfg, dist_info):
    if cfg.gradient_accumulation_steps % dist_info.world_size:
        stop(f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be a multiple of the "
             f"number of processes ({dist_info.world_size}): it counts micro-batches over all of them")
    return cfg.gradient_accumulation_steps // dist_info.world_size


def all_reduce_mean(tensor, dist_info):
    """Average over processes (gloo has no AVG op, so SUM then divide)."""
    if dist_info.ddp:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        dist_info.hold(tensor)
        tensor /= dist_info.world_size
    return tensor


def gather_from_ranks(tensor, dist_info):
    """Every rank's copy of a same-shaped tensor, on the CPU (not all_gather_object: see shutdown_distributed)."""
    if not dist_info.ddp:
        return [tensor]
    tensor = tensor.to(dist_info.device)
    gathered = [torch.empty_like(tensor) for _ in range(dist_info.world_size)]
    dist.all_gather(gathered, tensor)
    for t in [tensor] + gathered:
        dist_info.hold(t)
    return [t.cpu() for t in gathered]


def autocast_context(cfg, device):
    """bf16 autocast on GPUs that have it (bf16 has float32's range: no loss scaling, unlike fp16)."""
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


# -----------------------------------------------------------------------------
# The model and optimizer train() builds (the benchmark and the experiments too); FLOPs for the MFU in the log
# -----------------------------------------------------------------------------
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout", "patch_size")


def make_model(cfg):
    return GPT(GPTConfig(**{key: cfg[key] for key in MODEL_KEYS}))


def model_vocab_size(cfg, meta):
    """The dataset's vocabulary when it says so; a large one is rounded up to a multiple of 64
    (50257 -> 50304) for faster matmuls: the extra logits are never targets and learn to vanish."""
    vocab = cfg.vocab_size if meta is None else meta["vocab_size"]
    return vocab if vocab <= 64 else 64 * math.ceil(vocab / 64)


def make_optimizer(model, cfg, device):
    """AdamW with weight decay on matrices (matmul and embedding weights), none on gains and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
              "L4": 121e12, "RTX 4090": 165e12, "V100": 125e12}  # dense bf16 FLOP/s


def peak_flops(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def flops_per_token(model):
    """6 FLOPs per parameter per token (forward + backward) plus attention (PaLM appendix B).
    MBE adds P / (12 n_embd) of a block's FLOPs, under 0.1% at 124M, so it is left out."""
    c = model.config
    return 6 * (model.num_params() - model.wpe.weight.numel()) + 12 * c.n_layer * c.n_embd * c.block_size


# -----------------------------------------------------------------------------
# Checkpoints: atomic, weights_only-loadable, and enough state to resume exactly
# -----------------------------------------------------------------------------
CHECKPOINT_KEYS = ("model", "optimizer", "config", "iter_num", "best_val_loss", "gapt", "rng")


def save_checkpoint(path, checkpoint):
    """Write to a temporary file, then rename: a crash mid-write leaves the previous checkpoint."""
    tmp = path + ".tmp"
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk, a read-only folder (torch reports some as RuntimeError)
        stop(f"could not write the checkpoint {path} ({e}); the previous one, if any, is "
             f"intact. Free disk space or choose another --out_dir, then resume with --init_from=resume")
    finally:
        remove_if_exists(tmp)  # a partial file would only keep the disk full (also after Ctrl-C mid-write)


def keep_best_checkpoint(out_dir):
    """best.pt, the lowest validation CE so far: a hard link to ckpt.pt (no disk until a later, worse
    checkpoint replaces ckpt.pt), or a copy where the file system has no hard links."""
    ckpt, best, tmp = (os.path.join(out_dir, name) for name in ("ckpt.pt", "best.pt", "best.pt.tmp"))
    try:
        remove_if_exists(tmp)
        try:
            os.link(ckpt, tmp)
        except OSError:
            shutil.copyfile(ckpt, tmp)
        os.replace(tmp, best)
    except OSError as e:
        stop(f"could not keep {ckpt} as {best} ({e}); {ckpt} is intact: free disk space, "
             f"then resume with --init_from=resume")
    finally:
        remove_if_exists(tmp)


def remove_if_exists(path):
    if os.path.exists(path):
        os.remove(path)


def load_checkpoint(path, device, fix="start again with --init_from=scratch"):
    """A checkpoint gapt.py wrote, or a one-line error: what is wrong with the file, then `fix`."""
    if not os.path.exists(path):
        stop(f"init_from=resume but there is no checkpoint at {path}; "
             f"start a new run with --init_from=scratch or point --out_dir at the run to resume")
    try:
        # weights_only: only tensors and plain values are unpickled, so a checkpoint cannot run code
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises many kinds for an empty, truncated or foreign file
        stop(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]}); "
             f"it may be truncated or not from gapt.py: {fix}")
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    missing += [f"config[{k!r}]" for k in (*MODEL_KEYS, "dataset", "data_dir")
                if isinstance(config, dict) and k not in config]
    if missing:
        stop(f"{path} is not a gapt.py checkpoint (no {', '.join(missing)}); "
             f"{fix} or point --out_dir at a gapt.py run")
    return checkpoint


def load_weights(model, state, fix="start again with --init_from=scratch"):
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # missing or unexpected keys, other shapes: not the model its config describes
        stop(f"the checkpoint's weights do not fit the model its config describes "
             f"({next((l.strip() for l in str(e).splitlines()[1:]), str(e))[:160]} ...); the file was edited "
             f"or mixed up with another run's: {fix}")


def say_what_changed_since(checkpoint, cfg):
    """Resuming with other settings is allowed, never silently: one line names every one that changed."""
    saved = checkpoint["config"]
    changed = [f"{key} {saved[key]!r} -> {cfg[key]!r}" for key in cfg
               if key != "init_from" and key in saved and saved[key] != cfg[key]]
    if changed:
        print(f"{os.path.basename(sys.argv[0])}: resuming at iter {checkpoint['iter_num']} with settings changed "
              f"since the checkpoint: {', '.join(changed)}")


def rng_states(data_gen, dist_info):
    """Every rank's RNG states (torch, data, CUDA), one dict per rank, sent as one uint8 tensor per rank."""
    states = dict(torch=torch.get_rng_state(), data=data_gen.get_state())
    if dist_info.device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(dist_info.device)
    sizes = [len(v) for v in states.values()]
    return [dict(zip(states, map(torch.clone, packed.split(sizes))))
            for packed in gather_from_ranks(torch.cat(list(states.values())), dist_info)]


def restore_run(checkpoint, model, optimizer, gate, data_gen, dist_info):
    """A checkpoint's state into the fresh run, each rank its own RNG streams; returns (iter_num,
    best_val_loss, the checkpointed step's phase: None in checkpoints older than that key)."""
    if checkpoint is None:
        return 0, math.inf, None
    load_weights(model, checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    gate.load_state_dict(checkpoint["gapt"])
    states, rank, device = checkpoint["rng"], dist_info.rank, dist_info.device
    if rank < len(states):
        data_gen.set_state(states[rank]["data"].cpu())
        torch.set_rng_state(states[rank]["torch"].cpu())
        if device.type == "cuda" and "cuda" in states[rank]:
            torch.cuda.set_rng_state(states[rank]["cuda"].cpu(), device)
    else:
        print(f"gapt.py: checkpoint has RNG states for {len(states)} processes, not {rank + 1}: "
              f"rank {rank} keeps its fresh seed, so the run is no longer bit-exact")
    return checkpoint["iter_num"], checkpoint["best_val_loss"], checkpoint.get("phase")


# -----------------------------------------------------------------------------
# Data and out_dir checks, before anything is written (the format's own checks are in prepare_data.py)
# -----------------------------------------------------------------------------
def check_data(cfg):
    """meta.json, the train and val files and the arithmetic answer sets; a bad dataset stops the
    run with nothing in out_dir to clean up."""
    meta = read_meta(cfg.data_dir, cfg.dataset)
    paths = {split: check_split(cfg.data_dir, cfg.dataset, split, cfg.block_size, meta) for split in ("train", "val")}
    sets = answer_sets(cfg.data_dir, cfg.dataset, meta, cfg.answer_eval_examples)
    if cfg.init_from == "resume" and model_vocab_size(cfg, meta) != cfg.vocab_size:  # then cfg has the checkpoint's
        stop(f"the checkpoint's model has a vocabulary of {cfg.vocab_size} but dataset '{cfg.dataset}' needs "
             f"{model_vocab_size(cfg, meta)}: it was trained on another dataset. Resume with its own --dataset, "
             f"or start a new run with --init_from=scratch")
    if cfg.gate_reads == "test_ood":
        if not sets and not os.path.exists(os.path.join(cfg.data_dir, cfg.dataset, "test_ood.bin")):
            stop(f"gate_reads=test_ood reads the test_ood split of arithmetic data, and '{cfg.dataset}' is not "
                 f"arithmetic data (prepare_data.py arithmetic writes it); use --gate_reads=train")
        paths["test_ood"] = check_split(cfg.data_dir, cfg.dataset, "test_ood", cfg.block_size, meta)
    if meta is None:  # nothing says which token ids the files hold: read them once (seconds per GB)
        largest = max(int(max(data[i:i + 2 ** 26].max() for i in range(0, len(data), 2 ** 26)))
                      for data in (np.memmap(path, dtype=np.uint16, mode="r") for path in paths.values()))
        if largest >= cfg.vocab_size:
            stop(f"dataset '{cfg.dataset}' has no meta.json and holds token id {largest}, beyond vocab_size "
                 f"{cfg.vocab_size}: set --vocab_size={largest + 1} or more (or prepare it with prepare_data.py, "
                 f"which writes meta.json)")
    for split, (examples, _) in sets.items():
        longest = max(len(e) for e in examples)  # scored with the example as input, minus its last token
        if longest - 1 > cfg.block_size:
            stop(f"block_size ({cfg.block_size}) is too short for the {split} examples of "
                 f"'{cfg.dataset}' ({longest} tokens); use at least {longest - 1}")
    return meta, paths, sets


def check_out_dir(cfg):
    """A new run never overwrites a finished one, and out_dir must be a folder we can write."""
    if cfg.init_from == "scratch" and os.path.exists(os.path.join(cfg.out_dir, "ckpt.pt")):
        stop(f"out_dir {cfg.out_dir!r} holds a run (ckpt.pt): continue it with --init_from=resume, "
             f"choose another --out_dir, or delete {cfg.out_dir!r} to start over")
    check_writable(cfg.out_dir)


def check_writable(out_dir):
    """out_dir, or the nearest existing folder on its way, must be a writable folder (the experiments' too)."""
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        stop(f"out_dir {out_dir!r} cannot be written ({existing} is not a writable folder); choose another --out_dir")


# -----------------------------------------------------------------------------
# Logging: a stdout line and a JSON row in out_dir/log.jsonl per logged step, evaluation,
# alignment measurement and phase change
# -----------------------------------------------------------------------------
def start_log(cfg, dist_info, iter_num, model, micro_steps):
    """A new run starts a new log; a resumed one keeps its rows up to its checkpoint's evaluation."""
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    if dist_info.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        for name in ("ckpt.pt.tmp", "best.pt.tmp"):  # left by a run killed while it wrote a checkpoint
            remove_if_exists(os.path.join(cfg.out_dir, name))
        rows = read_log(log_path) if cfg.init_from == "resume" else []
        ends = [i for i, r in enumerate(rows) if r.get("event") == "eval" and r.get("iter") == iter_num]
        with open(log_path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows[:ends[-1] + 1 if ends else len(rows)])
        append_jsonl(log_path, dict(event="start", iter=iter_num, world_size=dist_info.world_size, config=cfg))
        print(f"{model.num_params() / 1e6:.2f}M parameters, {dist_info.world_size} process(es) on "
              f"{dist_info.device.type}, {micro_steps} micro-steps of {cfg.batch_size}x{cfg.block_size} tokens "
              f"each per process")
    return log_path


def read_log(path):
    """The rows of a log.jsonl; a line torn by a crash mid-write (only ever the last) is left out."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def read_back_steps(history, phases, resumed_phase, cfg, log_path, dist_info):
    """The steps since the last log, read back in one sync: each loss is checked, each phase change gets
    its row (a resumed run's first step against the checkpointed phase); returns the last step's row."""
    values = torch.stack([torch.stack([ce, mbe_reg, torch.as_tensor(phase).to(ce)])
                          for _, _, ce, mbe_reg, phase in history]).tolist()  # (steps, 3): the one sync
    previous = phases[-1] if phases else resumed_phase
    for (it, lr, *_), (ce, mbe_reg, phase) in zip(history, values):
        stop_if_not_finite(ce, "the training loss", it, cfg)
        if previous is not None and phase != previous and dist_info.master:
            append_jsonl(log_path, dict(iter=it, event="phase_change", phase=int(phase)))
        previous = int(phase)
        phases.append(previous)
    return dict(iter=it, phase=int(phase), ce=ce, mbe=mbe_reg, lr=lr)


def append_jsonl(path, row):
    with open(path, "a") as f:  # open per row: a crash never loses the rows before it
        f.write(json.dumps(row) + "\n")


FORMATS = dict(lr="{:.2e}", ms_per_step="{:.1f}", tok_per_s="{:,}", mfu="{:.1%}")


def format_row(row):
    """One stdout line from a log row (lists such as per-block MBEs stay in the JSON only)."""
    return " | ".join(f"{key} " + FORMATS.get(key, "{:.4f}" if isinstance(value, float) else "{}").format(value)
                      for key, value in row.items() if not isinstance(value, list))


def stop_if_not_finite(value, what, iter_num, cfg):
    if not math.isfinite(value):
        stop(f"{what} is {value} at iter {iter_num}; stopping without saving. Resume from "
             f"{os.path.join(cfg.out_dir, 'ckpt.pt')} (the last checkpoint; best.pt beside it has the "
             f"best validation CE) with --init_from=resume and a lower --learning_rate or --mbe_weight")


def resume_hint(cfg):
    """What Ctrl-C leaves: the last checkpoint, and the command that continues from it."""
    if not os.path.exists(os.path.join(cfg.out_dir, "ckpt.pt")):
        return "interrupted before the first checkpoint: nothing to resume, run the same command to start again"
    return (f"interrupted; {os.path.join(cfg.out_dir, 'ckpt.pt')} holds the last evaluation's state: run the same "
            f"command with --init_from=resume to continue from it")


if __name__ == "__main__":
    config = load_config(sys.argv[1:])
    try:
        train(config)
    except KeyboardInterrupt:
        stop(resume_hint(config))
