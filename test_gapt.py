"""The gapt test suite: a specification of the behaviour, runnable on a 2-core CPU.

    python -m pytest -q test_gapt.py
"""

import contextlib
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
import torch
import torch.nn.functional as F

import gapt
import prepare_data
import sample
from experiments import bench, forgetting, gpu_check, launch_check, report, threads, vs_nanogpt
from gapt import GAPT, GPT, GPTConfig, mbe, patch_mbe

HERE = os.path.dirname(os.path.abspath(__file__))
# torch 2.13's own torch.compile path calls its deprecated torch.jit.script_method (14 warnings a
# suite, none from our code): silenced so that a warning of ours stands out
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def kill_tree(process):
    """SIGKILL a program started by run_program or launched() and everything it started."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextlib.contextmanager
def launched(*commands, env=None, cwd=None):
    """Programs started as a user starts them, each in a process group of its own, so that however the
    test ends (passed, failed, timed out) the whole tree goes with it: torchrun's ranks, tokenizer workers."""
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                  cwd=cwd, start_new_session=True) for command in commands]
    try:
        yield processes
    finally:
        for process in processes:
            kill_tree(process)


def run_program(command, timeout, env=None, cwd=None):
    """One program to its end (a CompletedProcess); a timeout fails the test and kills the tree."""
    with launched(command, env=env, cwd=cwd) as (process,):
        out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(command, process.returncode, out, err)


# -----------------------------------------------------------------------------
# Helpers: tiny datasets and configs, the training log, the arithmetic vocabularies
# -----------------------------------------------------------------------------
def write_dataset(data_dir, name="tiny", vocab_size=32, n_train=20000, n_val=4000, seed=0, tokenizer="gpt2"):
    """A learnable token stream (a noisy counter modulo vocab_size) in prepare_data.py's layout."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(data_dir, name)
    os.makedirs(folder, exist_ok=True)
    counts = {}
    for split, n in (("train", n_train), ("val", n_val)):
        tokens = (np.arange(n) + (rng.random(n) < 0.1) * rng.integers(0, vocab_size, n)) % vocab_size
        tokens.astype(np.uint16).tofile(os.path.join(folder, f"{split}.bin"))
        counts[split] = n
    meta = dict(tokenizer=tokenizer, vocab_size=vocab_size, eot_token=vocab_size - 1, dtype="uint16", tokens=counts)
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)
    return folder


TINY = dict(dataset="tiny", n_layer=3, n_head=2, n_embd=16, block_size=16, batch_size=4,
            gradient_accumulation_steps=2, mbe_skip_first=1, mbe_skip_last=1, max_iters=6, warmup_iters=1,
            lr_decay_iters=6, learning_rate=3e-3, eval_interval=3, eval_iters=2, log_interval=1,
            align_interval=0, compile=False, device="cpu", patch_size=4)


def tiny_args(tmp_path, **overrides):
    settings = {**TINY, "data_dir": tmp_path / "data", "out_dir": tmp_path / "out", **overrides}
    return [f"--{k}={v}" for k, v in settings.items()]


def tiny_config(tmp_path, **overrides):
    return gapt.load_config(tiny_args(tmp_path, **overrides))


@pytest.fixture
def data(tmp_path):
    return write_dataset(str(tmp_path / "data"))


def log_rows(out_dir):
    """out_dir's log.jsonl as gapt.read_log reads it back, which must have left no line out: in a test
    log none is torn or unreadable (gapt.read_log leaves out a line torn by a crash)."""
    path = os.path.join(out_dir, "log.jsonl")
    rows = gapt.read_log(path)
    with open(path) as f:
        assert len(rows) == len(f.readlines()), f"{path} holds a line that is not a row"
    return rows


def step_rows(out_dir):
    return [r for r in log_rows(out_dir) if "ce" in r]


def load_ckpt(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)


def stops(call, *args, **kwargs):
    """What a program stops with, called in-process: a SystemExit of one line of text, which Python prints
    to stderr, without a traceback, before it exits with status 1 (the tests that run the programs as a
    user runs them check that)."""
    with pytest.raises(SystemExit) as stop:
        call(*args, **kwargs)
    message = stop.value.code
    assert isinstance(message, str) and "\n" not in message, message
    return message


def run_gapt(*args, env=None, launcher=(sys.executable,)):
    """gapt.py as a user runs it; returns the CompletedProcess."""
    return run_program([*launcher, os.path.join(HERE, "gapt.py"), *args], timeout=300, env=env)


# documents and datasets as prepare_data.py writes them (the tests of gapt.py and sample.py use them too)
EOT = 50256
DOCS = [  # varied documents: unicode, newlines, an empty one, and the eot marker written as plain text
    "hello world", "Ça va? 日本語のテキスト 🙂", "line one\nline two\n", "", "a <|endoftext|> b",
    *[f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 7 + 1) for i in range(40)],
]
NONEMPTY = [d for d in DOCS if d]


def prepare(tmp_path, *args):
    prepare_data.main([*args, "--data_dir", str(tmp_path / "data")])


def write_jsonl(path, docs, column="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, column: d}) + "\n")


ARITHMETIC_CHARS = list("0123456789*=\n")  # prepare_data.py's vocabulary: id = index
ARITH_EQ, ARITH_EOT = ARITHMETIC_CHARS.index("="), ARITHMETIC_CHARS.index("\n")


def encode_chars(text):
    return [ARITHMETIC_CHARS.index(c) for c in text]


def decode_chars(ids):
    return "".join(ARITHMETIC_CHARS[i] for i in ids)


# the author's arithmetic format: prepare_data.py arithmetic --format author
AUTHOR_TOKENS = ["<bos>", "<eos>", "x", "=", " ", *"0123456789"]  # their DigitTokenizer: id = index


# -----------------------------------------------------------------------------
# MBE
# -----------------------------------------------------------------------------
def reference_entropy(Z, alpha):
    """Renyi entropy of the eigenvalues of K / tr(K), K = Z Z^T, in float64 numpy."""
    K = Z @ Z.T
    p = np.clip(np.linalg.eigvalsh(K / np.trace(K)), 0, None)
    if alpha == 1:
        p = p[p > 0]
        return -(p * np.log(p)).sum()
    return np.log((p ** alpha).sum()) / (1 - alpha)


@pytest.mark.parametrize("alpha", [0.5, 1, 2, 3])
def test_mbe_matches_an_independent_eigenvalue_computation(alpha):
    Z = torch.randn(4, 6, 10, generator=torch.Generator().manual_seed(0))
    expected = [reference_entropy(z.double().numpy(), alpha) for z in Z]
    assert mbe(Z, alpha).tolist() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("alpha", [1, 2, 3])
def test_mbe_is_zero_when_all_rows_are_parallel(alpha):
    Z = torch.outer(torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.randn(7))  # rank 1
    assert mbe(Z, alpha).item() == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("alpha", [1, 2, 3])
def test_mbe_is_log_n_for_orthogonal_rows_of_equal_norm(alpha):
    Z = 3.0 * torch.eye(8, 12)[torch.randperm(8)]
    assert mbe(Z, alpha).item() == pytest.approx(math.log(8), rel=1e-5)


def test_mbe_is_invariant_to_global_scale():
    Z = torch.randn(3, 8, 16)
    # down to the scale where the eps = 1e-5 guard inside the logs starts to matter
    for scale in (0.1, 7.0, 1000.0):
        assert torch.allclose(mbe(Z), mbe(scale * Z), rtol=1e-4)


def test_mbe_of_bf16_input_is_computed_in_float32_even_under_autocast():
    Z = torch.randn(5, 8, 64).bfloat16()
    exact = mbe(Z.float())
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        result = mbe(Z)
    assert result.dtype == torch.float32
    assert torch.allclose(result, exact, rtol=1e-6)  # a bf16 Gram matrix is off by ~1e-3


def test_mbe_of_a_zero_matrix_is_finite_and_has_finite_gradient():
    Z = torch.zeros(2, 8, 4, requires_grad=True)
    value = mbe(Z).sum()
    value.backward()
    assert torch.isfinite(value) and value.item() == 0.0
    assert torch.isfinite(Z.grad).all()


def test_patch_mbe_is_the_mean_of_mbe_over_patches():
    h = torch.randn(2, 12, 5)
    patches = [h[b, t:t + 4] for b in range(2) for t in range(0, 12, 4)]
    expected = torch.stack([mbe(p) for p in patches]).mean()
    assert torch.allclose(patch_mbe(h, 4), expected)


def spectrum(tokens):
    """gapt.patch_spectrum of one patch (P, C), as a dict."""
    return dict(zip(gapt.SPECTRUM_KEYS, gapt.patch_spectrum(tokens[None], len(tokens)).tolist()))


def test_patch_spectrum_of_orthonormal_tokens_is_log_p_with_equal_eigenvalues():
    s = spectrum(torch.eye(8, 16))
    assert s["mbe"] == pytest.approx(math.log(8), abs=1e-4) and s["mbe_alpha1"] == pytest.approx(math.log(8), abs=1e-4)
    assert s["top_share"] == pytest.approx(1 / 8, abs=1e-4)


def test_patch_spectrum_tells_one_large_shared_direction_from_few_directions_used():
    torch.manual_seed(0)
    noise = 0.05 * torch.linalg.qr(torch.randn(16, 8))[0].T  # 8 small orthogonal directions
    shared = torch.zeros(16)
    shared[0] = 1.0
    one_large_direction = shared + noise - noise @ shared[:, None] * shared  # the noise keeps off the shared axis
    s = spectrum(one_large_direction)
    assert s["mbe"] < 0.05 and s["top_share"] > 0.97  # alpha-2 MBE reads this patch as fully compressed ...
    assert s["mbe_centred"] > 1.5  # ... but around their mean the tokens still use many directions
    one_direction = torch.linspace(0.5, 2.0, 8)[:, None] * shared  # magnitudes vary, one direction only
    s = spectrum(one_direction)
    assert s["mbe"] < 1e-4 and s["mbe_centred"] < 1e-4 and s["top_share"] == pytest.approx(1.0, abs=1e-5)


def test_patch_mbe_rejects_a_length_that_is_not_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        patch_mbe(torch.randn(1, 10, 4), 4)


# -----------------------------------------------------------------------------
# The model
# -----------------------------------------------------------------------------
def tiny_model(vocab_size=64, **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=vocab_size, n_layer=3, n_head=2, n_embd=32, patch_size=4, **kw))


def test_initial_loss_is_near_log_vocab():
    model = tiny_model(vocab_size=512)
    x, y = torch.randint(512, (8, 16)), torch.randint(512, (8, 16))
    _, ce, mbe_blocks = model(x, y)
    assert ce.item() == pytest.approx(math.log(512), rel=0.02)
    assert mbe_blocks.shape == (3,) and (mbe_blocks >= 0).all() and (mbe_blocks <= math.log(4) + 1e-5).all()


def test_a_tiny_model_overfits_one_batch():
    model = tiny_model()
    x, y = torch.randint(64, (4, 16)), torch.randint(64, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        _, ce, _ = model(x, y)
        optimizer.zero_grad()
        ce.backward()
        optimizer.step()
    assert ce.item() < 0.1


# -----------------------------------------------------------------------------
# IBLM: the three modes differ only in the MBE weight of each step
# -----------------------------------------------------------------------------
def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("mode, gate_phase, phase, weight", [
    ("baseline", 1, 1, 0.0), ("baseline", 2, 1, 0.0), ("iblm", 1, 2, 0.5), ("iblm", 2, 2, 0.5),
    ("gapt", 1, 1, 0.0), ("gapt", 2, 2, 0.5)])
def test_mbe_weight_is_off_in_baseline_always_on_in_iblm_and_follows_the_gate_in_gapt(mode, gate_phase, phase, weight):
    gate = GAPT()
    gate.load_state_dict(dict(gate.state_dict(), phase=gate_phase))
    assert [float(v) for v in gapt.phase_and_weight(mode, 0.5, gate)] == [phase, weight]


@pytest.mark.parametrize("weight, gets_mbe_gradient", [(0.0, False), (1.0, True), (torch.tensor(0.0), False),
                                                       (torch.tensor(1.0), True)])
def test_iblm_loss_adds_the_mbe_gradient_only_when_its_weight_is_on(weight, gets_mbe_gradient):
    model = tiny_model()
    x = torch.randint(64, (4, 16))
    _, ce, mbe_blocks = model(x, x)
    ce_only = grads(model, ce)
    _, ce, mbe_blocks = model(x, x)
    combined = grads(model, gapt.iblm_loss(ce, gapt.regularized_mbe(mbe_blocks, 1, 1), weight))
    assert torch.equal(ce_only, combined) != gets_mbe_gradient


def test_regularized_mbe_is_the_mean_of_the_middle_blocks():
    blocks = torch.tensor([9.0, 1.0, 2.0, 3.0, 9.0, 9.0])
    assert gapt.regularized_mbe(blocks, 1, 2).item() == 2.0


# -----------------------------------------------------------------------------
# The GAPT gate
# -----------------------------------------------------------------------------
class PseudoCodeGate:
    """The paper's pseudo-code (the rule above GAPT in gapt.py), transcribed line by line in plain Python."""

    def __init__(self, delta_ce, delta_mbe, patience_mem, patience_comp, tau):
        self.d_ce, self.d_mbe, self.p_m, self.p_c, self.tau = delta_ce, delta_mbe, patience_mem, patience_comp, tau
        self.phase, self.s_m, self.s_c, self.ce_min, self.mbe_min = 1, 0, 0, math.inf, math.inf

    def step(self, ce, mbe):
        if self.phase == 1:
            self.s_m = 0 if ce < self.ce_min - self.d_ce else self.s_m + 1
            self.ce_min = min(self.ce_min, ce)
            if self.s_m >= self.p_m:
                self.phase, self.s_c, self.ce_min, self.mbe_min = 2, 0, math.inf, math.inf
        else:
            self.ce_min = min(self.ce_min, ce)
            if ce > (1 + self.tau) * self.ce_min:
                self.phase, self.s_m = 1, 0
            else:
                self.s_c = 0 if mbe < self.mbe_min - self.d_mbe else self.s_c + 1
                self.mbe_min = min(self.mbe_min, mbe)
                if self.s_c >= self.p_c:
                    self.phase, self.s_m = 1, 0
        return self.phase


def phases_of(gate, losses):
    return [int(gate.step(ce, m)) for ce, m in losses]


def test_gapt_switches_to_compression_exactly_after_patience_mem_steps_without_ce_progress():
    gate = GAPT(delta_ce=0.01, patience_mem=3)
    losses = [(5.0, 1.0), (4.0, 1.0), (3.995, 1.0), (3.999, 1.0), (3.991, 1.0), (3.0, 1.0)]
    # 5.0 and 4.0 improve; 3.995 (< 0.01 better), 3.999 and 3.991 do not: the third of them switches
    assert phases_of(gate, losses[:5]) == [1, 1, 1, 1, 2]


def test_gapt_returns_to_memorization_when_ce_rises_above_one_plus_tau_times_its_minimum():
    gate = GAPT(patience_mem=1, patience_comp=100, tau=0.1)
    phases = phases_of(gate, [(2.0, 1.0), (2.0, 1.0), (1.0, 0.9), (1.09, 0.8), (1.11, 0.7)])
    assert phases == [1, 2, 2, 2, 1]  # 1.09 <= 1.1 * 1.0 stays; 1.11 > 1.1 leaves


def test_gapt_returns_to_memorization_when_mbe_plateaus_for_patience_comp_steps():
    gate = GAPT(patience_mem=1, patience_comp=2, delta_mbe=0.002)
    phases = phases_of(gate, [(2.0, 1.0), (2.0, 1.0), (2.0, 0.9), (2.0, 0.8), (2.0, 0.799), (2.0, 0.8)])
    assert phases == [1, 2, 2, 2, 2, 1]  # 0.799 and 0.8 are not 0.002 below the best 0.8


@pytest.mark.parametrize("seed", range(5))
def test_gapt_follows_the_pseudocode_on_random_loss_sequences(seed):
    rng = np.random.default_rng(seed)
    settings = dict(delta_ce=0.05, delta_mbe=0.02, patience_mem=3, patience_comp=4, tau=0.1)
    gate, reference = GAPT(**settings), PseudoCodeGate(**settings)
    # a slowly falling CE with plateaus and spikes, an MBE that wanders
    ce = 4.0 - np.cumsum(rng.choice([0.0, 0.0, 0.03, 0.1], 400)) / 20 + rng.choice([0, 0, 0, 0.6], 400)
    mbe_values = 1.5 + np.cumsum(rng.normal(0, 0.02, 400))
    for c, m in zip(ce.tolist(), mbe_values.tolist()):
        assert int(gate.step(c, m)) == reference.step(c, m)
        assert gate.state_dict() == dict(phase=reference.phase, s_m=reference.s_m, s_c=reference.s_c,
                                         ce_min=reference.ce_min, mbe_min=reference.mbe_min)
    assert 0 < sum(p == 2 for p in phases_of(GAPT(**settings), zip(ce, mbe_values))) < 400  # both phases seen


@pytest.mark.parametrize("comp_end", ["plateau", "patience"])
def test_gapt_state_round_trips_through_state_dict(comp_end):
    losses = [(3.0 - 0.001 * i, 1.0 + 0.01 * (i % 7)) for i in range(40)]
    first = GAPT(patience_mem=5, patience_comp=5, comp_end=comp_end)
    phases_of(first, losses[:20])
    second = GAPT(patience_mem=5, patience_comp=5, comp_end=comp_end)
    second.load_state_dict(first.state_dict())
    assert second.state_dict() == first.state_dict()
    assert phases_of(second, losses[20:]) == phases_of(first, losses[20:])


class ExecutedGate:
    """The gate of the author's code as it ran (RRScheduler._switch_phase in src/utils.py of
    fangyuan-ksgk/mod_gpt, plain GAPT: no inner cycle), transcribed line by line in plain Python."""

    def __init__(self, delta_ce, delta_mbe, patience_mem, patience_comp, tau):
        self.d_ce, self.d_mbe, self.p_m, self.p_c, self.tau = delta_ce, delta_mbe, patience_mem, patience_comp, tau
        self.phase, self.mem_counter, self.comp_counter, self.min_entropy = 1, 0, 0, math.inf

    def step(self, ce, mbe):
        ce_improvement = max(0.0, self.min_entropy - ce)
        worse_memorization = ce >= self.min_entropy * (1 + self.tau)
        self.min_entropy = min(self.min_entropy, ce)
        mbe_improvement = 0.0  # computed only in the inner cycle, which plain GAPT never enters
        better_memorization = ce_improvement > self.d_ce and ce_improvement != math.inf
        better_compression = mbe_improvement > self.d_mbe
        self.mem_counter = 0 if better_memorization else self.mem_counter + 1
        self.comp_counter = 0 if better_compression else self.comp_counter + 1
        if self.phase == 2 and (self.comp_counter >= self.p_c or worse_memorization):
            self.phase, self.mem_counter = 1, 0
        elif self.phase == 1 and self.mem_counter >= self.p_m:
            self.phase, self.comp_counter, self.min_entropy = 2, 0, math.inf
        return self.phase


@pytest.mark.parametrize("seed", range(5))
def test_gapt_with_comp_end_patience_follows_the_authors_executed_gate_on_random_loss_sequences(seed):
    rng = np.random.default_rng(seed)
    settings = dict(delta_ce=0.05, delta_mbe=0.02, patience_mem=3, patience_comp=4, tau=0.1)
    gate, reference = GAPT(**settings, comp_end="patience"), ExecutedGate(**settings)
    ce = 4.0 - np.cumsum(rng.choice([0.0, 0.0, 0.03, 0.1], 400)) / 20 + rng.choice([0, 0, 0, 0.6], 400)
    mbe_values = 1.5 - np.cumsum(rng.uniform(0, 0.05, 400))  # MBE keeps falling: a plateau never ends a phase
    phases = []
    for c, m in zip(ce.tolist(), mbe_values.tolist()):
        phases.append(int(gate.step(c, m)))
        assert phases[-1] == reference.step(c, m)
        state = gate.state_dict()
        assert state["ce_min"] == reference.min_entropy
        # the counter of the current phase (each rule resets the other one on the way in)
        assert (state["s_m"] == reference.mem_counter) if phases[-1] == 1 else (state["s_c"] == reference.comp_counter)
    assert 0 < sum(p == 2 for p in phases) < 400


def test_comp_end_patience_compresses_for_exactly_patience_comp_steps_while_mbe_still_falls():
    losses = [(2.0, 1.0)] * 3 + [(2.0, 1.0 - 0.1 * i) for i in range(1, 8)]
    plateau, patience = (GAPT(patience_mem=2, patience_comp=3, comp_end=end) for end in ("plateau", "patience"))
    assert phases_of(plateau, losses) == [1, 1, 2, 2, 2, 2, 2, 2, 2, 2]  # MBE keeps improving: compression goes on
    # 3 steps of compression, then memorization; the run's first step counts as no CE progress, so it starts sooner
    assert phases_of(patience, losses) == [1, 2, 2, 2, 1, 1, 2, 2, 2, 1]


def test_comp_end_patience_still_ends_compression_when_ce_rises_above_one_plus_tau():
    gate = GAPT(patience_mem=1, patience_comp=100, tau=0.1, comp_end="patience")
    assert phases_of(gate, [(2.0, 1.0), (1.0, 0.9), (1.09, 0.8), (1.11, 0.7)]) == [2, 2, 2, 1]


def write_test_ood(data, token=3, n=4096):
    """A test_ood split of one repeated token: its CE is nothing like the training CE."""
    np.full(n, token, dtype=np.uint16).tofile(os.path.join(data, "test_ood.bin"))


@pytest.mark.parametrize("gate_reads", ["train", "test_ood"])
def test_the_gate_reads_the_training_ce_unless_told_to_read_the_test_ood_loss(tmp_path, data, monkeypatch, gate_reads):
    write_test_ood(data)
    seen = {"gate": [], "train": [], "test_ood": []}
    record = lambda key, f: lambda *a, **k: seen[key].append(f(*a, **k)) or seen[key][-1]
    monkeypatch.setattr(gapt, "train_step", record("train", gapt.train_step))
    monkeypatch.setattr(gapt, "leaked_test_ce", record("test_ood", gapt.leaked_test_ce))
    monkeypatch.setattr(GAPT, "step", lambda gate, ce, mbe_reg, step=GAPT.step: seen["gate"].append(ce) or step(gate, ce, mbe_reg))
    gapt.train(tiny_config(tmp_path, mode="gapt", gate_reads=gate_reads))
    train_ce = [float(stats[0]) for stats in seen["train"]]
    gate_ce = [float(ce) for ce in seen["gate"]]
    assert len(gate_ce) == 6 and len(seen["test_ood"]) == (6 if gate_reads == "test_ood" else 0)
    assert gate_ce == (train_ce if gate_reads == "train" else [float(ce) for ce in seen["test_ood"]])
    assert (gate_ce == train_ce) == (gate_reads == "train")


def test_the_leaked_test_loss_is_the_models_ce_on_test_ood_windows(tmp_path, data):
    write_test_ood(data)
    cfg = tiny_config(tmp_path, gate_reads="test_ood")
    model = gapt.make_model(cfg)
    _, paths, _ = gapt.check_data(cfg)
    leaked = gapt.leaked_test_ce(model, 4, cfg, paths, contextlib.nullcontext(), gapt.Dist(0, 0, 1, torch.device("cpu")))
    threes = torch.full((cfg.batch_size, cfg.block_size), 3)  # every test_ood window, whatever its start
    assert leaked.item() == pytest.approx(model(threes, threes)[1].item(), rel=1e-6)
    assert model.training  # evaluated in eval mode, handed back in training mode


def test_gate_reads_test_ood_without_a_test_ood_file_stops_naming_the_command_that_writes_it(tmp_path):
    prepare(tmp_path, "arithmetic", "--n_train", "2000", "--n_val", "200")
    os.remove(tmp_path / "data" / "arithmetic" / "test_ood.bin")
    with pytest.raises(SystemExit, match="has no .*test_ood.bin; prepare it with: python prepare_data.py arithmetic"):
        gapt.train(tiny_config(tmp_path, dataset="arithmetic", block_size=32, mode="gapt", gate_reads="test_ood"))
    assert not os.path.exists(tmp_path / "out")


def test_gate_reads_test_ood_on_text_data_says_only_arithmetic_data_has_that_split(tmp_path, data):
    with pytest.raises(SystemExit, match="is not arithmetic data .*use --gate_reads=train"):
        gapt.train(tiny_config(tmp_path, mode="gapt", gate_reads="test_ood"))
    assert not os.path.exists(tmp_path / "out")


class HostReadCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the reads of a tensor's value by the host (.item(), bool(), int(), an `if` on a tensor):
    each goes through aten._local_scalar_dense, and on a GPU each would wait for the device."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("comp_end", ["plateau", "patience"])
def test_gapt_step_never_reads_a_tensor_value_on_the_host(comp_end):
    gate = GAPT(patience_mem=2, patience_comp=3, comp_end=comp_end)
    losses = [(torch.tensor(2.0 - 0.01 * (i % 5)), torch.tensor(1.0 - 0.02 * i)) for i in range(30)]
    with HostReadCounter() as counter:
        phases = [gate.step(ce, m) for ce, m in losses]
    assert counter.reads == 0
    assert {int(p) for p in phases} == {1, 2}  # both branches ran
    with HostReadCounter() as counter:
        gate.phase  # the one read the gate offers, for the caller who needs the phase on the host
    assert counter.reads == 1


# -----------------------------------------------------------------------------
# Gradient alignment
# -----------------------------------------------------------------------------
def test_gradient_alignment_is_a_cosine_and_leaves_training_unchanged(tmp_path, data):
    gapt.train(tiny_config(tmp_path, out_dir=tmp_path / "off", dropout=0.1, mode="iblm"))
    gapt.train(tiny_config(tmp_path, out_dir=tmp_path / "on", dropout=0.1, mode="iblm", align_interval=2))
    rows = [r for r in log_rows(tmp_path / "on") if "align_cos" in r]
    assert [r["iter"] for r in rows] == [0, 2, 4]
    for r in rows:
        assert -1 <= r["align_cos"] <= 1
        assert r["align_cos_blocks"][-1] is None  # the top block is not regularized: no MBE gradient
        assert all(-1 <= c <= 1 for c in r["align_cos_blocks"][:-1])
    off, on = load_ckpt(tmp_path / "off"), load_ckpt(tmp_path / "on")
    assert all(torch.equal(off["model"][k], on["model"][k]) for k in off["model"])
    for s_off, s_on in zip(off["optimizer"]["state"].values(), on["optimizer"]["state"].values()):
        assert torch.equal(s_off["exp_avg_sq"], s_on["exp_avg_sq"])


# -----------------------------------------------------------------------------
# Training runs (in-process, tiny)
# -----------------------------------------------------------------------------
def test_training_logs_steps_evaluations_and_writes_a_checkpoint(tmp_path, data):
    result = gapt.train(tiny_config(tmp_path, mode="iblm"))
    rows = log_rows(tmp_path / "out")
    steps = [r for r in rows if "ce" in r]
    evals = [r for r in rows if r.get("event") == "eval"]
    assert [r["iter"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert {"iter", "phase", "ce", "mbe", "lr", "tok_per_s"} <= set(steps[0])
    assert [r["iter"] for r in evals] == [3, 6] and len(evals[0]["val_mbe_blocks"]) == 3
    assert evals[0]["val_mbe_all"] == pytest.approx(np.mean(evals[0]["val_mbe_blocks"]), abs=1e-4)
    assert all(len(evals[0][f"val_{key}_blocks"]) == 3 for key in gapt.SPECTRUM_KEYS)
    assert all(1 / 4 - 1e-4 <= share <= 1 + 1e-4 for share in evals[0]["val_top_share_blocks"])  # patch_size 4
    assert steps[-1]["ce"] < steps[0]["ce"]
    ckpt = load_ckpt(tmp_path / "out")
    assert ckpt["iter_num"] == 6 and ckpt["config"]["mode"] == "iblm"
    assert torch.equal(ckpt["model"]["wte.weight"], result["model"].wte.weight)


def test_gradient_accumulation_over_k_micro_steps_matches_one_big_batch(tmp_path, data):
    """One optimizer step (plain SGD, so parameter change = -lr * gradient) with the IBLM loss."""
    single = gapt.Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    cfg = tiny_config(tmp_path, grad_clip=0.0)
    starts = np.random.default_rng(0).integers(19000, size=8)
    models = [tiny_model(vocab_size=32) for _ in range(2)]
    stats = [gapt.train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), starts.reshape(k, 8 // k), 1.0, cfg,
                             os.path.join(data, "train.bin"), nullcontext(), single)
             for model, k in zip(models, (4, 1))]
    assert torch.allclose(stats[0], stats[1], atol=1e-6)
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.allclose(p, q, atol=1e-6)


def test_gapt_mode_follows_its_gate_on_the_logged_losses(tmp_path, data):
    settings = dict(delta_ce=0.5, delta_mbe=0.5, patience_mem=2, patience_comp=2, tau=0.1)
    result = gapt.train(tiny_config(tmp_path, mode="gapt", max_iters=12, lr_decay_iters=12, **settings))
    steps = step_rows(tmp_path / "out")
    replay = GAPT(**settings)
    expected = [1] + [int(replay.step(r["ce"], r["mbe"])) for r in steps[:-1]]
    assert [r["phase"] for r in steps] == expected == result["phases"]
    assert 2 in expected
    changes = [r["iter"] for r in log_rows(tmp_path / "out") if r.get("event") == "phase_change"]
    assert changes == [r["iter"] for a, r in zip(steps, steps[1:]) if a["phase"] != r["phase"]]


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, data, monkeypatch):
    real_loss = gapt.iblm_loss
    calls = []

    def loss_that_explodes(ce, mbe_reg, weight):
        calls.append(1)
        return real_loss(ce, mbe_reg, weight) * (math.nan if len(calls) > 8 else 1.0)  # step 5 onwards

    monkeypatch.setattr(gapt, "iblm_loss", loss_that_explodes)
    with pytest.raises(SystemExit, match="not finite|nan") as stop:
        gapt.train(tiny_config(tmp_path, mode="iblm"))
    assert "ckpt.pt" in str(stop.value)
    assert load_ckpt(tmp_path / "out")["iter_num"] == 3


@pytest.mark.parametrize("mode", ["baseline", "iblm", "gapt"])
def test_compiled_training_is_one_graph_without_breaks_in_every_mode_and_never_recompiles_at_phase_changes(
        tmp_path, data, mode):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    result = gapt.train(tiny_config(tmp_path, compile=True, mode=mode, max_iters=8, lr_decay_iters=8,
                                    patience_mem=1, patience_comp=1, delta_ce=0.5, delta_mbe=0.5))
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1  # one graph, compiled once, for both phases
    assert mode != "gapt" or {1, 2} <= set(result["phases"])
    assert all(math.isfinite(r["ce"]) for r in step_rows(tmp_path / "out"))


def test_training_steps_read_nothing_back_from_the_device_between_logs(tmp_path, data, monkeypatch):
    """Every .item(), .tolist(), bool() or float() of a tensor in gapt.py would make the CPU wait for
    a GPU: in GAPT mode, with the gate switching phases, their number must not grow with the steps.
    (PyTorch's own CPU code, such as Adam's step counter on CPU, is not counted.)"""
    reads = []

    def counted(real):
        def read(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename == gapt.__file__:
                reads.append(1)
            return real(self, *args, **kwargs)
        return read

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
    counts = []
    for steps in (4, 12):
        reads.clear()
        result = gapt.train(tiny_config(tmp_path, out_dir=tmp_path / f"out{steps}", mode="gapt", max_iters=steps,
                                        lr_decay_iters=steps, log_interval=steps,
                                        eval_interval=steps, patience_mem=1, patience_comp=1, delta_ce=0.5, delta_mbe=0.5))
        counts.append(len(reads))
    assert 2 in result["phases"] and 1 in result["phases"]
    assert counts[0] == counts[1]


# ---- on each kind of dataset prepare_data.py writes ----

@pytest.mark.parametrize("kind", ["txt", "jsonl", "arithmetic"])
def test_gapt_trains_a_few_steps_on_each_kind_of_prepared_dataset(tmp_path, kind):
    data_dir = str(tmp_path / "data")
    if kind == "arithmetic":
        prepare_data.main(["arithmetic", "--n_train", "500", "--n_val", "30", "--data_dir", data_dir])
    else:
        source = tmp_path / f"corpus.{kind}"
        if kind == "txt":
            source.write_text("\n\n".join(NONEMPTY))
        else:
            write_jsonl(source, NONEMPTY)
        prepare_data.main(["text", "--files", str(source), "--dataset", kind, "--val_tokens", "100", "--val_every", "5",
                           "--num_proc", "1", "--data_dir", data_dir])
    result = gapt.train(tiny_config(tmp_path, dataset=kind, max_iters=2, eval_interval=2, answer_eval_examples=10,
                                    block_size=32))
    evaluation = [r for r in log_rows(tmp_path / "out") if r.get("event") == "eval"][-1]
    assert math.isfinite(evaluation["val_ce"])
    assert result["model"].config.vocab_size == (13 if kind == "arithmetic" else 50304)
    assert ("val_ood_answer_ce" in evaluation) == (kind == "arithmetic")
    assert ("val_answer_ce_in_context" in evaluation) == (kind == "arithmetic")  # val examples fit block_size / 2


def test_gapt_trains_and_scores_answers_on_the_author_format(tmp_path):
    prepare(tmp_path, "arithmetic", "--format", "author", "--n_train", "500", "--n_val", "30")
    settings = dict(dataset="arithmetic", data_dir=tmp_path / "data", out_dir=tmp_path / "out", n_layer=3, n_head=2,
                    n_embd=16, block_size=64, patch_size=8, batch_size=4, gradient_accumulation_steps=1,
                    mbe_skip_first=1, mbe_skip_last=1, max_iters=2, warmup_iters=1, lr_decay_iters=2,
                    eval_interval=2, eval_iters=1, log_interval=1, align_interval=0, answer_eval_examples=30,
                    compile=False, device="cpu")
    result = gapt.train(gapt.load_config([f"--{k}={v}" for k, v in settings.items()]))
    evaluation = [r for r in log_rows(tmp_path / "out") if r.get("event") == "eval"][-1]
    assert result["model"].config.vocab_size == 15
    assert all(math.isfinite(evaluation[f"{s}_answer_ce"]) for s in ["val", "val_ood"])


def test_the_pydocs_config_trains_on_a_corpus_of_documents_prepared_by_prepare_data(tmp_path):
    """config/pydocs.py after config/shakespeare.py (the paper's ~2.3-pass text regime, the Shakespeare
    model) on a small local corpus of one document per file, prepared as its header says: it trains,
    evaluates the all-block MBE and measures the alignment, with the gate's patience at 7% of the run
    and the cosine decay ending with it."""
    docs = tmp_path / "docs"
    docs.mkdir()
    text = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    for i in range(20):  # 20 documents of a few thousand tokens: every 10th goes to val
        (docs / f"doc{i:02d}.rst.txt").write_text(text[i * 2000:(i + 1) * 2000 + 4000] + f"\n\ndocument {i}\n")
    prepare_data.main(["text", f"--files={docs}/*.rst.txt", "--dataset=pydocs", "--sample_by=document",
                       f"--data_dir={tmp_path / 'data'}"])
    meta = json.loads((tmp_path / "data" / "pydocs" / "meta.json").read_text())
    assert meta["tokens"]["val"] > 0 and meta["tokens"]["train"] > 4 * meta["tokens"]["val"]
    configs = [os.path.join(HERE, "config", name) for name in ("shakespeare.py", "pydocs.py")]
    cfg = gapt.load_config([*configs, f"--data_dir={tmp_path / 'data'}",
                            f"--out_dir={tmp_path / 'out'}", "--max_iters=2", "--eval_interval=2", "--eval_iters=1",
                            "--align_interval=1", "--log_interval=1", "--mode=gapt", "--threads=1",
                            "--batch_size=2"])  # the config's model, a smaller batch: seconds, not a minute
    full = gapt.load_config(configs)
    assert full.lr_decay_iters == full.max_iters and 0 < full.warmup_iters < full.max_iters // 10
    assert full.patience_mem == full.patience_comp == round(0.07 * full.max_iters)
    gapt.train(cfg)
    rows = log_rows(tmp_path / "out")
    final = [r for r in rows if r.get("event") == "eval"][-1]
    assert final["iter"] == 2 and math.isfinite(final["val_ce"]) and len(final["val_mbe_blocks"]) == cfg.n_layer
    assert 0 < final["val_mbe_all"] <= math.log(cfg.patch_size) + 1e-4
    assert [r["iter"] for r in rows if "align_cos" in r] == [0, 1]


# -----------------------------------------------------------------------------
# Config: defaults, config files, --key=value overrides, and what each key must be
# -----------------------------------------------------------------------------
@pytest.mark.parametrize("script, defaults", [("gapt.py", gapt.DEFAULTS), ("sample.py", sample.SAMPLE_DEFAULTS)])
def test_help_lists_every_key_with_its_default_and_its_comment(script, defaults):
    done = run_program([sys.executable, os.path.join(HERE, script), "--help"], timeout=120)
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if line.strip().startswith("--")}
    assert set(lines) == {f"--{key}={default!r}" for key, default in defaults.items()}
    assert all(len(line.split()) > 1 for line in lines.values())  # every key has its one-line comment


def test_config_files_set_values_and_command_line_overrides_win(tmp_path):
    config_file = tmp_path / "small.py"
    config_file.write_text("n_layer = 6\nlearning_rate = 1e-3\nmode = 'iblm'\n")
    cfg = gapt.load_config([str(config_file), "--mode=baseline", "--compile=False"])
    assert (cfg["n_layer"], cfg["learning_rate"], cfg["mode"], cfg["compile"]) == (6, 1e-3, "baseline", False)


@pytest.mark.parametrize("override, message", [
    ("--colour=blue", "unknown config key 'colour'"),
    ("--n_layer=2.5", "n_layer must be int"),
    ("--block_size=18", "multiple of patch_size"),
    ("--dataset=missing", "python prepare_data.py text"),
    ("--mode=sometimes", "mode must be one of"),
    ("--comp_end=never", "comp_end must be one of plateau, patience"),
    ("--learning_rate=-1e-3", "learning_rate must be positive"),
    ("--dropout=1.0", "dropout must be in [0, 1)"),
    ("--beta1=2", "beta1 must be in [0, 1)"),
    ("--align_interval=-1", "align_interval must be >= 0"),
    ("--out_dir=", "out_dir must be a non-empty path"),
    ("--device=foo", "device must be 'auto', 'cpu', 'cuda'"),
    pytest.param("--device=cuda", "this torch has no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is there")),
])
def test_bad_input_exits_nonzero_with_a_clear_message_and_writes_nothing(tmp_path, data, override, message):
    assert message in stops(lambda: gapt.train(gapt.load_config([*tiny_args(tmp_path), override])))
    assert not (tmp_path / "out").exists()



# ---- as the user runs it: one line on stderr, a non-zero exit ----

def test_a_config_file_that_does_not_run_is_a_one_line_error(tmp_path, data):
    config = tmp_path / "broken.py"
    config.write_text("batch_size = (8\n")
    done = run_gapt(str(config), *tiny_args(tmp_path))
    assert done.returncode != 0 and "could not be read (SyntaxError" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# Processes and threads; DDP on CPU with gloo, as torchrun --nproc_per_node=8 and multi-node runs use it
# -----------------------------------------------------------------------------
@pytest.mark.parametrize("threads, env, expected", [
    (0, {}, max(1, (os.cpu_count() or 1) - 1)),  # auto: the cores but one
    (0, {"LOCAL_WORLD_SIZE": "8"}, max(1, ((os.cpu_count() or 1) - 1) // 8)),  # shared by torchrun's processes
    (0, {"OMP_NUM_THREADS": "3"}, "unchanged"),  # the user's (or torchrun's) choice wins
    (2, {"OMP_NUM_THREADS": "3"}, 2)])  # an explicit --threads wins over everything
def test_threads_default_to_the_cores_but_one_and_an_explicit_choice_wins(monkeypatch, threads, env, expected):
    before = torch.get_num_threads()
    for key in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    torch.set_num_threads(5)
    try:
        gapt.set_threads(threads)
        assert torch.get_num_threads() == (5 if expected == "unchanged" else expected)
    finally:
        torch.set_num_threads(before)


class ThreadsChosen(Exception):
    pass


@pytest.mark.parametrize("program", ["gapt", "sample", "bench", "forgetting"])
def test_every_program_hands_its_threads_to_torch_before_any_work(monkeypatch, tmp_path, program):
    def choose(threads):
        raise ThreadsChosen(threads)
    monkeypatch.setattr(gapt, "set_threads", choose)
    monkeypatch.setattr(forgetting, "set_threads", choose)
    out = f"--out_dir={tmp_path / 'out'}"
    run = {"gapt": lambda: gapt.train(gapt.load_config([out, "--threads=3"])),
           "sample": lambda: sample.main([out, "--threads=3"]),
           "bench": lambda: bench.run_bench(bench.load_config([out, "--threads=3"])),
           "forgetting": lambda: forgetting.run_forgetting(forgetting.load_config([out, "--threads=3"]))}[program]
    with pytest.raises(ThreadsChosen) as chosen:
        run()
    assert chosen.value.args == (3,)


DDP_SCRIPT = f"""
import os, sys, torch
sys.path.insert(0, {HERE!r})
import gapt
torch._dynamo.config.error_on_recompile = True  # a recompile (at a phase change, say) fails the rank
with open(os.path.join(os.environ["RESULT_DIR"], f"pid{{os.environ['RANK']}}"), "w") as f:
    f.write(str(os.getpid()))
result = gapt.train(gapt.load_config(sys.argv[1:]))
threads = [open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task")]
torch.save(dict(model=result["model"].state_dict(), phases=result["phases"], threads=threads),
           os.path.join(os.environ["RESULT_DIR"], f"rank{{os.environ['RANK']}}.pt"))
"""
LOCKSTEP = dict(mode="gapt", patience_mem=1, patience_comp=2, delta_ce=0.5, delta_mbe=0.5,
                align_interval=2)  # alignment: no collective may hang


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_TIMEOUT = 180  # seconds for one torchrun job of a few tiny steps; they take 5-40 s on 2 busy cores


def ddp_commands(result_dir, args, nproc=2, nodes=1):
    """torchrun as the README launches it: one launcher per node (all on this machine), gloo on CPU."""
    os.makedirs(result_dir, exist_ok=True)
    script = os.path.join(result_dir, "ddp_run.py")
    with open(script, "w") as f:
        f.write(DDP_SCRIPT)
    port = free_port()
    return [[sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nodes}",
             f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}", script, *args]
            for node in range(nodes)]


def ddp_env(result_dir):
    return dict(os.environ, RESULT_DIR=str(result_dir), OMP_NUM_THREADS="1")


def run_ddp(result_dir, args, nproc=2, nodes=1):
    """Every rank's result (final weights, phases, threads left after train())."""
    with launched(*ddp_commands(result_dir, args, nproc, nodes), env=ddp_env(result_dir)) as launchers:
        for launcher in launchers:
            _, err = launcher.communicate(timeout=DDP_TIMEOUT)
            assert launcher.returncode == 0, err[-3000:]
    return [torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=True) for r in range(nproc * nodes)]


def assert_ranks_match_a_single_process(ranks, single, atol=1e-5):
    # a gloo worker thread alive at interpreter exit can abort a finished run (see shutdown_distributed)
    assert not [name for rank in ranks for name in rank["threads"] if "gloo" in name]
    assert all(rank["phases"] == single["phases"] for rank in ranks)
    assert 1 in single["phases"] and 2 in single["phases"]
    for name, p in single["model"].state_dict().items():
        assert all(torch.equal(rank["model"][name], ranks[0]["model"][name]) for rank in ranks)
        assert torch.allclose(ranks[0]["model"][name], p, atol=atol)


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU")
@pytest.mark.parametrize("nproc, nodes", [(2, 1), (8, 1), (2, 2)], ids=["2 processes", "8 processes", "2 nodes x 2"])
def test_ddp_processes_stay_in_lockstep_and_match_a_single_process(tmp_path, data, nproc, nodes):
    settings = dict(LOCKSTEP, gradient_accumulation_steps=8)
    ranks = run_ddp(tmp_path / "ddp", tiny_args(tmp_path, out_dir=tmp_path / "ddp" / "out", **settings), nproc, nodes)
    single = gapt.train(tiny_config(tmp_path, out_dir=tmp_path / "single", **settings))
    assert len(ranks) == nproc * nodes
    assert_ranks_match_a_single_process(ranks, single)


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU")
def test_compiled_ddp_switches_phases_without_recompiling_and_matches_eager_ddp(tmp_path, data):
    settings = dict(LOCKSTEP, gradient_accumulation_steps=4, max_iters=8, lr_decay_iters=8)
    compiled = run_ddp(tmp_path / "compiled", tiny_args(tmp_path, out_dir=tmp_path / "compiled" / "out",
                                                        compile=True, **settings))
    eager = gapt.train(tiny_config(tmp_path, out_dir=tmp_path / "eager", **settings))
    assert_ranks_match_a_single_process(compiled, eager, atol=1e-4)


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU")
def test_resume_under_ddp_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, data):
    settings = dict(LOCKSTEP, dropout=0.1)  # dropout: each rank's own RNG stream must come back too
    straight = run_ddp(tmp_path / "straight", tiny_args(tmp_path, out_dir=tmp_path / "straight" / "out", **settings))
    halves = tmp_path / "halves"
    run_ddp(halves, tiny_args(tmp_path, out_dir=halves / "out", max_iters=3, **settings))
    resumed = run_ddp(halves, tiny_args(tmp_path, out_dir=halves / "out", init_from="resume", **settings))
    for name, p in straight[0]["model"].items():
        assert torch.equal(resumed[0]["model"][name], p) and torch.equal(resumed[1]["model"][name], p)
    assert straight[0]["phases"][3:] == resumed[0]["phases"]


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU")
def test_killing_one_ddp_rank_ends_the_job_and_its_last_checkpoint_resumes(tmp_path, data):
    out_dir = tmp_path / "ddp" / "out"
    settings = dict(max_iters=100000, lr_decay_iters=100000, eval_interval=2)
    commands = ddp_commands(tmp_path / "ddp", tiny_args(tmp_path, out_dir=out_dir, **settings))
    with launched(*commands, env=ddp_env(tmp_path / "ddp")) as (launcher,):
        deadline = time.time() + DDP_TIMEOUT
        while not (out_dir / "ckpt.pt").exists() and time.time() < deadline:
            time.sleep(0.2)
        os.kill(int((tmp_path / "ddp" / "pid1").read_text()), 9)
        launcher.communicate(timeout=DDP_TIMEOUT)  # the surviving rank is stopped by torchrun: no hang
    assert launcher.returncode != 0
    saved = load_ckpt(out_dir)["iter_num"]
    assert saved >= 2
    resumed = run_ddp(tmp_path / "ddp", tiny_args(tmp_path, out_dir=out_dir, init_from="resume",
                                                  **dict(settings, max_iters=saved + 2)))
    assert len(resumed[0]["phases"]) == 2 and load_ckpt(out_dir)["iter_num"] == saved + 2


# -----------------------------------------------------------------------------
# Checkpoints and resume
# -----------------------------------------------------------------------------
def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path, data):
    settings = dict(mode="gapt", dropout=0.1, patience_mem=1, patience_comp=2, delta_ce=0.5, delta_mbe=0.5)
    gapt.train(tiny_config(tmp_path, out_dir=tmp_path / "straight", **settings))
    gapt.train(tiny_config(tmp_path, out_dir=tmp_path / "halves", max_iters=3, **settings))
    gapt.train(tiny_config(tmp_path, out_dir=tmp_path / "halves", init_from="resume", **settings))
    straight, halves = step_rows(tmp_path / "straight"), step_rows(tmp_path / "halves")
    assert [(r["iter"], r["ce"], r["mbe"], r["phase"]) for r in straight] == \
           [(r["iter"], r["ce"], r["mbe"], r["phase"]) for r in halves]
    a, b = load_ckpt(tmp_path / "straight"), load_ckpt(tmp_path / "halves")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["gapt"] == b["gapt"]


def test_a_run_resumed_just_before_a_phase_change_logs_it_and_reports_as_the_straight_run(tmp_path, data):
    settings = dict(mode="gapt", patience_mem=1, patience_comp=2, delta_ce=0.5, delta_mbe=0.5, eval_interval=1)
    gapt.train(tiny_config(tmp_path, out_dir=tmp_path / "straight", **settings))
    changes = lambda out_dir: [r for r in log_rows(out_dir) if r.get("event") == "phase_change"]
    first = changes(tmp_path / "straight")[0]["iter"]  # the step whose phase differs from the one before
    gapt.train(tiny_config(tmp_path, out_dir=tmp_path / "halves", max_iters=first - 1, **settings))
    gapt.train(tiny_config(tmp_path, out_dir=tmp_path / "halves", init_from="resume", **settings))
    assert changes(tmp_path / "halves") == changes(tmp_path / "straight")
    assert report.summarize_runs([str(tmp_path / "halves")]) == report.summarize_runs([str(tmp_path / "straight")])


def test_resume_takes_the_architecture_from_the_checkpoint_before_checking_the_data(tmp_path, data):
    gapt.train(tiny_config(tmp_path, max_iters=2))
    # a block_size longer than the 4,000-token val split would be refused, were it the run's
    gapt.train(tiny_config(tmp_path, init_from="resume", block_size=8192))
    assert load_ckpt(tmp_path / "out")["config"]["block_size"] == TINY["block_size"]
    assert [r["iter"] for r in step_rows(tmp_path / "out")][-1] == TINY["max_iters"]


def test_resuming_with_other_settings_names_each_change_in_one_line(tmp_path, data, capsys):
    gapt.train(tiny_config(tmp_path, max_iters=3))
    capsys.readouterr()
    gapt.train(tiny_config(tmp_path, init_from="resume", mode="iblm", mbe_weight=0.5))
    line = next(l for l in capsys.readouterr().out.splitlines() if "changed since the checkpoint" in l)
    assert "resuming at iter 3" in line and "mode 'gapt' -> 'iblm'" in line and "mbe_weight 1.0 -> 0.5" in line
    assert "max_iters 3 -> 6" in line and "init_from" not in line


def test_an_interrupted_checkpoint_write_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    gapt.save_checkpoint(path, dict(iter_num=1, w=torch.ones(3)))

    def crash_mid_write(obj, f):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        gapt.save_checkpoint(path, dict(iter_num=2, w=torch.zeros(3)))
    assert torch.load(path, weights_only=True)["iter_num"] == 1


def test_a_checkpoint_that_cannot_be_written_is_a_one_line_error_and_leaves_no_partial_file(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    gapt.save_checkpoint(path, dict(step=1))

    def full_disk(obj, f):
        open(f, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gapt.torch, "save", full_disk)
    with pytest.raises(SystemExit, match="No space left on device"):
        gapt.save_checkpoint(path, dict(step=2))
    assert not os.path.exists(path + ".tmp")
    assert torch.load(path, weights_only=True) == dict(step=1)


def test_a_checkpoint_file_left_half_written_by_a_killed_run_is_removed_when_it_resumes(tmp_path, data):
    gapt.train(tiny_config(tmp_path, max_iters=3))
    (tmp_path / "out" / "ckpt.pt.tmp").write_bytes(b"half a checkpoint")
    gapt.train(tiny_config(tmp_path, init_from="resume"))
    assert not (tmp_path / "out" / "ckpt.pt.tmp").exists()


def test_best_pt_keeps_the_checkpoint_with_the_lowest_validation_ce(tmp_path, data):
    # a learning rate that rises to 1.0 by the end: validation CE wanders up and the last step is not the best
    gapt.train(tiny_config(tmp_path, max_iters=9, lr_decay_iters=9, warmup_iters=9, eval_interval=1, learning_rate=1.0))
    evals = [r for r in log_rows(tmp_path / "out") if r.get("event") == "eval"]
    best_row = min(evals, key=lambda r: r["val_ce"])
    assert best_row["iter"] < 9
    best = torch.load(tmp_path / "out" / "best.pt", weights_only=True)
    assert best["iter_num"] == best_row["iter"] and best["best_val_loss"] == best_row["val_ce"]
    assert load_ckpt(tmp_path / "out")["iter_num"] == 9


def test_best_pt_is_a_hard_link_to_ckpt_pt_while_the_latest_checkpoint_is_the_best(tmp_path, data):
    gapt.train(tiny_config(tmp_path, max_iters=2, eval_interval=1))  # validation CE falls at the first steps
    out = tmp_path / "out"
    assert os.stat(out / "best.pt").st_ino == os.stat(out / "ckpt.pt").st_ino  # no second copy on disk


def test_a_full_disk_while_keeping_best_pt_leaves_no_partial_file_and_the_suggested_resume_works(
        tmp_path, data, monkeypatch):
    def full_disk(src, dst):
        open(dst, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gapt.os, "link", full_disk)  # where hard links are refused, best.pt is copied
    monkeypatch.setattr(gapt.shutil, "copyfile", full_disk)
    with pytest.raises(SystemExit, match="No space left on device.*resume with --init_from=resume"):
        gapt.train(tiny_config(tmp_path))
    assert sorted(os.listdir(tmp_path / "out")) == ["ckpt.pt", "log.jsonl"]
    monkeypatch.undo()
    gapt.train(tiny_config(tmp_path, init_from="resume"))
    assert load_ckpt(tmp_path / "out")["iter_num"] == TINY["max_iters"]


@pytest.mark.parametrize("damage, message", [
    ("empty", "not a readable checkpoint"), ("garbage", "not a readable checkpoint"),
    ("truncated", "not a readable checkpoint"), ("foreign", "not a gapt.py checkpoint"),
])
def test_a_damaged_or_foreign_checkpoint_is_a_one_line_error(tmp_path, data, damage, message):
    gapt.train(tiny_config(tmp_path, max_iters=2))
    path = tmp_path / "out" / "ckpt.pt"
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(os.urandom(1000))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:2000])
    else:
        torch.save(dict(weights=torch.zeros(3)), path)
    assert message in stops(gapt.train, tiny_config(tmp_path, init_from="resume", max_iters=4))


def test_a_checkpoint_whose_weights_disagree_with_its_config_is_a_one_line_error(tmp_path, data):
    gapt.train(tiny_config(tmp_path, max_iters=2))
    checkpoint = load_ckpt(tmp_path / "out")
    checkpoint["config"]["n_layer"] = 4  # a block the weights do not have
    torch.save(checkpoint, tmp_path / "out" / "ckpt.pt")
    assert "weights do not fit" in stops(gapt.train, tiny_config(tmp_path, init_from="resume", max_iters=4))
    assert "weights do not fit" in stops(sample.main, [f"--out_dir={tmp_path / 'out'}"])


def test_resuming_onto_a_dataset_with_another_vocabulary_is_refused(tmp_path, data):
    gapt.train(tiny_config(tmp_path, max_iters=2))
    write_dataset(str(tmp_path / "data"), name="other", vocab_size=14)
    message = stops(gapt.train, tiny_config(tmp_path, init_from="resume", dataset="other", max_iters=4))
    assert "trained on another dataset" in message
    assert load_ckpt(tmp_path / "out")["iter_num"] == 2


def test_ctrl_c_ends_in_one_line_that_says_how_to_resume(tmp_path, data):
    args = tiny_args(tmp_path, max_iters=100000, lr_decay_iters=100000, eval_interval=2)
    # Ctrl-C as in a terminal: a suite started in the background (`pytest &`) passes SIGINT on ignored,
    # and Python then never turns it into KeyboardInterrupt, so gapt.py starts with it restored
    as_in_a_terminal = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    with launched([sys.executable, "-c", as_in_a_terminal, os.path.join(HERE, "gapt.py"), *args]) as (process,):
        deadline = time.time() + 120
        while not (tmp_path / "out" / "ckpt.pt").exists() and time.time() < deadline:
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode != 0 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith("run the same command with --init_from=resume to continue from it")


# -----------------------------------------------------------------------------
# Data and out_dir checks: every problem stops the run before anything is written
# -----------------------------------------------------------------------------
def test_data_without_meta_json_holding_ids_beyond_vocab_size_is_refused_naming_the_size_needed(tmp_path, data):
    os.remove(os.path.join(data, "meta.json"))
    with pytest.raises(SystemExit, match="no meta.json and holds token id 31, beyond vocab_size 16: set --vocab_size=32"):
        gapt.train(tiny_config(tmp_path, vocab_size=16))
    assert not os.path.exists(tmp_path / "out")
    gapt.train(tiny_config(tmp_path, vocab_size=32, max_iters=1))


def test_a_meta_json_with_a_missing_or_mistyped_key_is_a_one_line_error(tmp_path, data):
    meta_path = os.path.join(data, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    with open(meta_path, "w") as f:
        json.dump(dict(meta, vocab_size="32"), f)
    assert "mistypes vocab_size" in stops(gapt.train, tiny_config(tmp_path))


@pytest.mark.parametrize("damage, message", [
    ("missing", "has no .*val_ood.bin; prepare it with: python prepare_data.py arithmetic"),
    ("odd", "val_ood.bin has an odd number of bytes"),
    ("truncated", "val_ood.bin holds .* tokens but meta.json says"),
    ("random bytes", r"val_ood.bin does not hold a\*b=c examples .*prepare it again with: python prepare_data.py arithmetic"),
])
def test_a_missing_or_damaged_val_ood_split_is_refused_before_training(tmp_path, damage, message):
    """val_ood carries the paper's headline metric: a run never trains without it, or on part of it."""
    prepare(tmp_path, "arithmetic", "--n_train=2000", "--n_val=200")
    path = tmp_path / "data" / "arithmetic" / "val_ood.bin"
    data = path.read_bytes()
    if damage == "missing":
        path.unlink()
    elif damage == "odd":
        path.write_bytes(data + b"x")
    elif damage == "truncated":
        path.write_bytes(data[:len(data) // 4 * 2])  # whole tokens, half of them
    else:
        path.write_bytes(np.random.default_rng(0).integers(0, 2 ** 16, len(data) // 2, dtype=np.uint16).tobytes())
    with pytest.raises(SystemExit, match=message):
        gapt.train(tiny_config(tmp_path, dataset="arithmetic", block_size=32))
    assert not os.path.exists(tmp_path / "out")


def test_a_truncated_bin_file_is_refused_with_the_command_to_rebuild_it(tmp_path, data):
    with open(os.path.join(data, "train.bin"), "r+b") as f:
        f.truncate(1000)
    with pytest.raises(SystemExit, match="meta.json says 20000.*prepare_data.py"):
        gapt.train(tiny_config(tmp_path))


def test_arithmetic_data_with_examples_longer_than_the_context_is_refused(tmp_path):
    prepare_data.main(["arithmetic", "--n_train", "500", "--n_val", "30", "--data_dir", str(tmp_path / "data")])
    with pytest.raises(SystemExit, match="block_size .16. is too short for the val_ood examples"):
        gapt.train(tiny_config(tmp_path, dataset="arithmetic"))
    assert not (tmp_path / "out").exists()


def test_a_new_run_refuses_the_out_dir_of_a_finished_run(tmp_path, data):
    gapt.train(tiny_config(tmp_path, max_iters=2))
    before = {name: (tmp_path / "out" / name).read_bytes() for name in ("ckpt.pt", "log.jsonl")}
    message = stops(gapt.train, tiny_config(tmp_path, max_iters=2))
    assert "holds a run" in message and "--init_from=resume" in message
    assert before == {name: (tmp_path / "out" / name).read_bytes() for name in before}


def test_an_out_dir_that_cannot_be_written_is_refused_before_anything_runs(tmp_path, data, monkeypatch):
    monkeypatch.setattr(gapt.os, "access", lambda path, mode: False)  # as a read-only folder answers
    with pytest.raises(SystemExit, match="is not a writable folder\\); choose another --out_dir"):
        gapt.train(tiny_config(tmp_path))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("out_dir", ["a_file", "a_file/run"])
def test_an_out_dir_that_is_a_file_or_lies_under_one_is_refused_before_anything_runs(tmp_path, data, out_dir):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit, match="a_file is not a writable folder"):
        gapt.train(tiny_config(tmp_path, out_dir=tmp_path / out_dir))


# -----------------------------------------------------------------------------
# Logging
# -----------------------------------------------------------------------------
def test_a_resumed_run_logs_each_step_once_even_after_a_crash_and_a_torn_line(tmp_path, data):
    out = tmp_path / "out"
    gapt.train(tiny_config(tmp_path, max_iters=3))
    at_iter_3 = (out / "ckpt.pt").read_bytes()
    gapt.train(tiny_config(tmp_path, init_from="resume"))  # logs steps 4-6 and saves at 6
    (out / "ckpt.pt").write_bytes(at_iter_3)  # as if the run had died before its checkpoint at 6 ...
    with open(out / "log.jsonl", "a") as f:
        f.write('{"iter": 7, "ce": 1.')  # ... in the middle of writing a row
    assert gapt.read_log(out / "log.jsonl")[-1]["iter"] == 6  # the torn line is left out
    gapt.train(tiny_config(tmp_path, init_from="resume"))
    assert [r["iter"] for r in step_rows(out)] == [1, 2, 3, 4, 5, 6]
    assert [r["iter"] for r in log_rows(out) if r.get("event") == "eval"] == [3, 6]
    assert report.read_run(str(out))[0] == TINY.get("mode", gapt.DEFAULTS["mode"])


# -----------------------------------------------------------------------------
# Data: prepare_data.py
# -----------------------------------------------------------------------------
def read_bin(path):
    return np.fromfile(path, dtype=np.uint16).tolist()


def expected_tokens(docs):
    enc = prepare_data.tokenizer()
    return [t for d in docs for t in enc.encode_ordinary(d) + [EOT]]


def split_docs(docs, val_every):
    """The documented split rule with an unbounded --val_tokens: document i goes to val iff i % val_every == 0."""
    return ([d for i, d in enumerate(docs) if i % val_every != 0],
            [d for i, d in enumerate(docs) if i % val_every == 0])


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


# ---- tokenizer and text datasets ----

def test_tiktoken_gpt2_known_answer():
    enc = prepare_data.tokenizer()
    assert enc.encode_ordinary("hello world") == [31373, 995]
    assert (enc.n_vocab, enc.eot_token) == (50257, EOT)


def test_text_jsonl_tokens_decode_back_to_documents(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", DOCS[:20])
    write_jsonl(tmp_path / "b.jsonl", DOCS[20:])
    prepare(tmp_path, "text", "--files", str(tmp_path / "*.jsonl"), "--dataset", "docs", "--val_every", "3",
            "--num_proc", "2")
    out = tmp_path / "data" / "docs"
    train_docs, val_docs = split_docs(NONEMPTY, 3)  # the empty document is skipped
    enc = prepare_data.tokenizer()
    for split, docs in [("train", train_docs), ("val", val_docs)]:
        tokens = read_bin(out / f"{split}.bin")
        assert tokens == expected_tokens(docs)
        assert enc.decode(tokens) == "".join(d + "<|endoftext|>" for d in docs)
        assert tokens.count(EOT) == len(docs)  # the literal "<|endoftext|>" in a document is plain text
    meta = json.loads((out / "meta.json").read_text())
    assert meta == {"tokenizer": "gpt2", "vocab_size": 50257, "eot_token": EOT, "dtype": "uint16",
                    "tokens": {"train": len(expected_tokens(train_docs)), "val": len(expected_tokens(val_docs))},
                    "command": meta["command"]}
    assert meta["command"].startswith("python prepare_data.py text --files ")
    assert files_under(tmp_path / "data") == ["docs/meta.json", "docs/train.bin", "docs/val.bin"]


def test_text_parquet_tokens_decode_back_to_documents(tmp_path):
    pq.write_table(pa.table({"content": DOCS, "n": list(range(len(DOCS)))}), tmp_path / "docs.parquet")
    prepare(tmp_path, "text", "--files", str(tmp_path / "docs.parquet"), "--dataset", "pq",
            "--text_column", "content", "--val_every", "4", "--num_proc", "1")
    train_docs, val_docs = split_docs(NONEMPTY, 4)
    assert read_bin(tmp_path / "data/pq/train.bin") == expected_tokens(train_docs)
    assert read_bin(tmp_path / "data/pq/val.bin") == expected_tokens(val_docs)


def test_text_txt_paragraphs_are_documents(tmp_path):
    paragraphs = ["First Citizen:\nBefore we proceed any further, hear me speak.", "All:\nSpeak, speak.",
                  "First Citizen:\nYou are all resolved rather to die than to famish?", "All:\nResolved."]
    (tmp_path / "play.txt").write_text("\n\n".join(paragraphs) + "\n")
    prepare(tmp_path, "text", "--files", str(tmp_path / "play.txt"), "--dataset", "play", "--val_every", "2")
    enc = prepare_data.tokenizer()
    train, val = read_bin(tmp_path / "data/play/train.bin"), read_bin(tmp_path / "data/play/val.bin")
    # paragraphs 0 and 2 go to val; the file's final newline stays with the last paragraph
    assert enc.decode(val) == f"{paragraphs[0]}<|endoftext|>{paragraphs[2]}<|endoftext|>"
    assert enc.decode(train) == f"{paragraphs[1]}<|endoftext|>{paragraphs[3]}\n<|endoftext|>"


def test_text_txt_sample_by_document_makes_each_file_a_document(tmp_path):
    for i in range(4):
        (tmp_path / f"book{i}.txt").write_text(f"Book {i}.\n\nIts second paragraph.\n")
    prepare(tmp_path, "text", "--files", str(tmp_path / "book*.txt"), "--dataset", "books", "--val_every", "2",
            "--sample_by", "document")
    enc = prepare_data.tokenizer()
    assert enc.decode(read_bin(tmp_path / "data/books/val.bin")) == "".join(
        f"Book {i}.\n\nIts second paragraph.\n<|endoftext|>" for i in (0, 2))


def test_max_tokens_is_honoured_and_keeps_a_prefix_of_the_full_run(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", DOCS)
    common = ["text", "--files", str(tmp_path / "d.jsonl"), "--val_every", "5", "--val_tokens", "100"]
    prepare(tmp_path, *common, "--dataset", "full")
    prepare(tmp_path, *common, "--dataset", "cut", "--max_tokens", "333")
    meta = json.loads((tmp_path / "data/cut/meta.json").read_text())
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == 333
    for split in ["train", "val"]:
        cut, full = read_bin(tmp_path / f"data/cut/{split}.bin"), read_bin(tmp_path / f"data/full/{split}.bin")
        assert len(cut) == meta["tokens"][split] and cut == full[:len(cut)]


def test_split_is_by_whole_documents_until_val_tokens_and_deterministic(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", DOCS)
    args = ["text", "--files", str(tmp_path / "d.jsonl"), "--dataset", "d", "--val_every", "2", "--val_tokens", "50"]
    prepare(tmp_path, *args)
    first = {s: (tmp_path / f"data/d/{s}.bin").read_bytes() for s in ["train", "val"]}
    # val takes documents 0, 2, 4, ... whole, and stops taking them once it holds 50 tokens
    val_docs, n = [], 0
    for d in NONEMPTY[::2]:
        if n >= 50:
            break
        val_docs.append(d)
        n += len(expected_tokens([d]))
    assert read_bin(tmp_path / "data/d/val.bin") == expected_tokens(val_docs)
    assert read_bin(tmp_path / "data/d/train.bin") == expected_tokens([d for d in NONEMPTY if d not in val_docs])
    prepare(tmp_path, *args)  # re-running the same command is safe and gives the same bytes
    assert {s: (tmp_path / f"data/d/{s}.bin").read_bytes() for s in ["train", "val"]} == first


def test_spawned_worker_processes_tokenize_the_same(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", DOCS)
    script = (f"import multiprocessing, sys; sys.path.insert(0, {HERE!r}); import prepare_data; "
              f"multiprocessing.set_start_method('spawn'); prepare_data.main(['text', '--files', "
              f"{str(tmp_path / 'd.jsonl')!r}, '--dataset', 'd', '--num_proc', '2', '--data_dir', {str(tmp_path / 'data')!r}])")
    done = run_program([sys.executable, "-c", script], timeout=120)
    assert done.returncode == 0, done.stderr
    train_docs, _ = split_docs(NONEMPTY, 10)
    assert read_bin(tmp_path / "data/d/train.bin") == expected_tokens(train_docs)


# ---- bad inputs: a one-line error, a non-zero exit, nothing half-written ----

def assert_fails(tmp_path, message, *args):
    with pytest.raises(SystemExit) as e:
        prepare(tmp_path, *args)
    assert re.fullmatch(r"\S+\.py: [^\n]+", str(e.value)) and message in str(e.value)  # one line, the program's name first
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("name, content, message", [
    ("latin1.txt", b"caf\xe9 au lait\n\nmore text\n", "must be UTF-8"),
    ("broken.jsonl", b'{"text": "fine"}\n{"text": broken\n', "every .jsonl line one JSON object"),
    ("folder", None, "got the folder"),
])
def test_unreadable_input_files_are_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        path.mkdir()
        (path / "a.txt").write_text("text")
    else:
        path.write_bytes(content)
    assert_fails(tmp_path, message, "text", "--files", str(path), "--dataset", "x")


def test_an_input_error_in_the_middle_of_the_stream_comes_back_and_leaves_no_files(tmp_path):
    def texts():  # read by the pool's feeder thread, as a large file is
        yield from ["some text"] * 600
        raise prepare_data.InputError("cannot read the input")

    args = prepare_data.build_parser().parse_args(["text", "--files", "x.txt", "--dataset", "d"])
    with pytest.raises(prepare_data.InputError):
        prepare_data.prepare_text(texts(), args, str(tmp_path / "d"), "python prepare_data.py text")
    assert list(tmp_path.rglob("*.bin*")) == []


def test_no_matching_files_is_an_error(tmp_path):
    assert_fails(tmp_path, "no files match", "text", "--files", str(tmp_path / "nothing*.jsonl"), "--dataset", "x")


def test_missing_text_column_is_an_error(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", DOCS, column="body")
    assert_fails(tmp_path, "no column 'text'", "text", "--files", str(tmp_path / "d.jsonl"), "--dataset", "x")


def test_token_ids_beyond_uint16_are_refused(tmp_path, monkeypatch):
    class BigTokenizer:  # like cl100k_base: its ids do not fit the uint16 .bin format
        n_vocab = 100_277
    monkeypatch.setattr(prepare_data, "tokenizer", BigTokenizer)
    write_jsonl(tmp_path / "d.jsonl", DOCS)
    assert_fails(tmp_path, "do not fit the uint16", "text", "--files", str(tmp_path / "d.jsonl"), "--dataset", "x")


def test_max_tokens_below_val_tokens_is_an_error(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", DOCS)
    assert_fails(tmp_path, "smaller than the validation slice", "text", "--files", str(tmp_path / "d.jsonl"),
                 "--dataset", "x", "--max_tokens", "100", "--val_tokens", "200")


def test_failure_while_writing_keeps_the_previous_files_and_leaves_no_temp(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "d.jsonl", DOCS)
    args = ["text", "--files", str(tmp_path / "d.jsonl"), "--dataset", "d"]
    prepare(tmp_path, *args)
    before = {name: (tmp_path / "data/d" / name).read_bytes() for name in ["train.bin", "val.bin", "meta.json"]}

    def texts_then_crash(ds, column):
        yield from NONEMPTY[:30]
        raise RuntimeError("connection lost mid-stream")
    monkeypatch.setattr(prepare_data, "document_texts", texts_then_crash)
    with pytest.raises(RuntimeError, match="mid-stream"):
        prepare(tmp_path, *args, "--num_proc", "1")
    assert files_under(tmp_path / "data") == ["d/meta.json", "d/train.bin", "d/val.bin"]
    assert {name: (tmp_path / "data/d" / name).read_bytes() for name in before} == before


def test_single_document_leaves_train_empty_and_writes_nothing(tmp_path):
    (tmp_path / "one.txt").write_text("just one paragraph\n")
    with pytest.raises(SystemExit, match="train split is empty"):
        prepare(tmp_path, "text", "--files", str(tmp_path / "one.txt"), "--dataset", "one")
    assert files_under(tmp_path / "data") == []


def cli(tmp_path, *args, **env):
    return run_program([sys.executable, os.path.join(HERE, "prepare_data.py"), *args], timeout=60, cwd=tmp_path,
                       env={**os.environ, **env})


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline_mode", "connection_refused"])
def test_hub_unreachable_fails_fast_and_says_how_to_use_local_files(tmp_path, env):
    start = time.time()
    result = cli(tmp_path, "fineweb", "--max_tokens", "1000", "--val_tokens", "100", **env)
    assert result.returncode != 0 and time.time() - start < 30
    assert "cannot reach 'HuggingFaceFW/fineweb'" in result.stderr
    assert "prepare_data.py text --files" in result.stderr
    assert not (tmp_path / "data").exists()


# ---- arithmetic ----

SPLITS = ["train", "val", "val_ood", "test_ood"]  # the files prepare_data.py arithmetic writes


def arithmetic_lines(out, split):
    chars = json.loads((out / "meta.json").read_text())["tokenizer"]
    text = "".join(chars[i] for i in read_bin(out / f"{split}.bin"))
    assert text.endswith("\n")
    return text[:-1].split("\n")


@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("arith")
    prepare(tmp_path, "arithmetic", "--n_train", "20000", "--n_val", "2000", "--seed", "3")
    return tmp_path / "data/arithmetic"


def test_arithmetic_every_line_is_a_correct_product_with_the_split_digit_ranges(arithmetic):
    for split, (lo, hi), n in [("train", (1, 3), 20000), ("val", (1, 3), 2000), ("val_ood", (4, 6), 2000),
                               ("test_ood", (4, 6), 2000)]:
        lines = arithmetic_lines(arithmetic, split)
        assert len(lines) == n
        operands = []
        for line in lines:
            prompt, c = line.split("=")
            a, b = prompt.split("*")
            assert int(c) == int(a) * int(b) and str(int(c)) == c
            assert str(int(a)) == a and str(int(b)) == b  # plain decimal, no leading zeros
            operands += [a, b]
        digit_share = np.bincount([len(x) for x in operands], minlength=hi + 1)[lo:] / len(operands)
        assert np.all(digit_share > 0.1)
        if split != "train":  # train is skewed on purpose: it never shows a val example, e.g. any 1-digit * 1-digit
            # the digit count is drawn uniformly first (uniform numbers would make nearly all of them hi digits)
            assert np.allclose(digit_share, 1 / (hi - lo + 1), atol=0.03)
    assert "0" in operands_of(arithmetic, "train")  # 0 is one of the ten 1-digit numbers


def operands_of(out, split):
    return {x for line in arithmetic_lines(out, split) for x in line.split("=")[0].split("*")}


def test_arithmetic_heldout_examples_never_appear_in_train(arithmetic):
    train = set(arithmetic_lines(arithmetic, "train"))
    assert not train & set(arithmetic_lines(arithmetic, "val"))
    assert not train & set(arithmetic_lines(arithmetic, "val_ood"))
    assert not set(arithmetic_lines(arithmetic, "test_ood")) & set(arithmetic_lines(arithmetic, "val_ood"))


def test_arithmetic_meta_matches_the_files(arithmetic):
    meta = json.loads((arithmetic / "meta.json").read_text())
    assert meta["tokenizer"] == list("0123456789*=\n") and meta["vocab_size"] == 13 and meta["eot_token"] == 12
    assert meta["dtype"] == "uint16"
    assert meta["tokens"] == {s: os.path.getsize(arithmetic / f"{s}.bin") // 2 for s in SPLITS}
    assert meta["command"].startswith("python prepare_data.py arithmetic --n_train 20000")


def test_arithmetic_same_seed_gives_identical_files(tmp_path, arithmetic):
    prepare(tmp_path / "same", "arithmetic", "--n_train", "20000", "--n_val", "2000", "--seed", "3")
    prepare(tmp_path / "other", "arithmetic", "--n_train", "20000", "--n_val", "2000", "--seed", "4")
    for split in SPLITS:
        same = (tmp_path / f"same/data/arithmetic/{split}.bin").read_bytes()
        assert same == (arithmetic / f"{split}.bin").read_bytes()
        assert same != (tmp_path / f"other/data/arithmetic/{split}.bin").read_bytes()


def test_examples_are_scored_after_the_end_of_example_token_that_precedes_them_in_training():
    tokens = np.array(encode_chars("2*3=6\n12*34=408\n"), dtype=np.uint16)
    assert prepare_data.split_examples(tokens, ARITH_EOT) == [encode_chars("\n2*3=6\n"), encode_chars("\n12*34=408\n")]


# ---- the author's arithmetic data: prepare_data.py arithmetic --format author ----

EXAMPLE = re.compile(r"<bos>(\d+) x (\d+) = (\d+)<eos>")


def decode(out, split):
    tokens = json.loads((out / "meta.json").read_text())["tokenizer"]
    return "".join(tokens[i] for i in np.fromfile(out / f"{split}.bin", dtype=np.uint16))


def examples(out, split):
    """[(a, b, c)] as strings, after checking that the split is nothing but whole examples."""
    text = decode(out, split)
    found = EXAMPLE.findall(text)
    assert "".join(f"<bos>{a} x {b} = {c}<eos>" for a, b, c in found) == text
    return found


@pytest.fixture(scope="module")
def author(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("author")
    prepare(tmp_path, "arithmetic", "--format", "author", "--n_train", "20000", "--n_val", "2000", "--seed", "3")
    return tmp_path / "data/arithmetic"


def test_author_format_writes_bos_a_x_b_eq_c_eos_with_the_true_product_and_the_authors_ids(author):
    for split, n in [("train", 20000), ("val", 2000), ("val_ood", 2000), ("test_ood", 2000)]:
        found = examples(author, split)
        assert len(found) == n
        for a, b, c in found:
            assert int(c) == int(a) * int(b)
            assert str(int(a)) == a and str(int(b)) == b and str(int(c)) == c  # no leading zeros
    first = "<bos>{} x {} = {}<eos>".format(*examples(author, "train")[0])
    ids = [AUTHOR_TOKENS.index(t) for t in re.findall(r"<bos>|<eos>|.", first)]  # their encode_multiplication
    assert np.fromfile(author / "train.bin", dtype=np.uint16)[:len(ids)].tolist() == ids


def test_author_operands_have_1_to_3_digits_uniformly_4_to_6_in_val_ood_and_no_zero(author):
    for split, (lo, hi) in [("train", (1, 3)), ("val", (1, 3)), ("val_ood", (4, 6)), ("test_ood", (4, 6))]:
        operands = [x for a, b, _ in examples(author, split) for x in (a, b)]
        digit_share = np.bincount([len(x) for x in operands], minlength=hi + 1)[lo:] / len(operands)
        assert len(digit_share) == hi - lo + 1 and np.allclose(digit_share, 1 / 3, atol=0.03)  # train too
    one_digit = {x for a, b, _ in examples(author, "train") for x in (a, b) if len(x) == 1}
    assert one_digit == set("123456789")  # their randint(10**0, 9): 0 is never drawn


def test_author_format_keeps_val_pairs_that_also_occur_in_train(author):
    # 1-digit x 1-digit is 1/9 of the examples over only 81 pairs, so their independent draws share many;
    # ours removes every one of them from train (test_arithmetic_heldout_examples_never_appear_in_train)
    train, val = set(examples(author, "train")), set(examples(author, "val"))
    assert len(train & val) > 50


def test_author_meta_is_read_back_and_answer_sets_cut_whole_examples_after_the_previous_eos(author):
    data_dir = str(author.parent)
    meta = prepare_data.read_meta(data_dir, "arithmetic")
    assert meta["tokenizer"] == AUTHOR_TOKENS and meta["vocab_size"] == 15 and meta["eot_token"] == 1
    assert meta["tokens"] == {s: os.path.getsize(author / f"{s}.bin") // 2 for s in SPLITS}
    sets = prepare_data.answer_sets(data_dir, "arithmetic", meta, 50)
    assert set(sets) == {"val", "val_ood", "test_ood"}
    for split, (cut, eq) in sets.items():
        assert eq == 3 and len(cut) == 50
        for example, (a, b, c) in zip(cut, examples(author, split)):
            assert example[:2] == [1, 0] and example[-1] == 1  # <eos> of the previous example, then <bos>
            text = "".join(AUTHOR_TOKENS[i] for i in example[1:])
            assert text == f"<bos>{a} x {b} = {c}<eos>"
            # what gapt.answer_ce scores, the targets after '=' and before the end: the space, then c
            assert "".join(AUTHOR_TOKENS[i] for i in example[example.index(eq) + 1:-1]) == f" {c}"


def test_the_default_format_is_ours_and_unchanged_by_the_option(tmp_path, arithmetic):
    prepare(tmp_path, "arithmetic", "--format", "ours", "--n_train", "20000", "--n_val", "2000", "--seed", "3")
    for split in SPLITS:  # the fixture was written without --format
        assert (tmp_path / f"data/arithmetic/{split}.bin").read_bytes() == (arithmetic / f"{split}.bin").read_bytes()
    meta = json.loads((tmp_path / "data/arithmetic/meta.json").read_text())
    assert meta["tokenizer"] == list("0123456789*=\n") and meta["vocab_size"] == 13 and meta["eot_token"] == 12


def test_an_unknown_format_is_a_one_line_error_naming_the_choices_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        prepare(tmp_path, "arithmetic", "--format", "authors")
    assert stop.value.code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(error) == 1 and "--format: invalid choice: 'authors'" in error[0] and "'author'" in error[0]
    assert not (tmp_path / "data").exists()


# ---- one style, one meaning per option ----

def usage_error(capsys, tmp_path, *args):
    """argparse's one error line for args (after its usage lines), once sure it exits 2 and writes nothing."""
    with pytest.raises(SystemExit) as e:
        prepare(tmp_path, *args)
    assert e.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert not (tmp_path / "data").exists()
    return errors[0]


EVERY_OPTION = {  # for each command, a value other than the default for each of its options
    "fineweb": dict(hf_id="HuggingFaceFW/fineweb-edu", hf_config="sample-100BT", dataset="edu", text_column="body",
                    max_tokens=5000, val_tokens=500, val_every=3, num_proc=3, data_dir="elsewhere"),
    "text": dict(files=["a.txt"], dataset="books", sample_by="line", text_column="body", max_tokens=5000,
                 val_tokens=500, val_every=3, num_proc=3, data_dir="elsewhere"),
    "arithmetic": dict(n_train=500, n_val=30, format="author", seed=7, dataset="arith", data_dir="elsewhere"),
}


def test_help_documents_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as done:
        prepare_data.main(["--help"])
    assert done.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    defaults = {"--data_dir": "data", "--text_column": "text", "--max_tokens": None, "--val_tokens": 10_000_000,
                "--val_every": 10, "--num_proc": os.cpu_count(), "--hf_id": "HuggingFaceFW/fineweb",
                "--hf_config": "sample-10BT", "--dataset": "fineweb", "--sample_by": "paragraph",
                "--n_train": 1_000_000, "--n_val": 10_000, "--seed": 0}
    for option, default in defaults.items():
        assert f"{option} " in help_text and f"(default: {default})" in help_text
    assert "--files FILES [FILES ...]" in help_text


@pytest.mark.parametrize("command", EVERY_OPTION)
def test_every_option_of_every_command_takes_the_key_equals_value_form_as_gapt_py_does(command):
    expected = EVERY_OPTION[command]
    options = {f"--{key}": value[0] if isinstance(value, list) else value for key, value in expected.items()}
    parse = prepare_data.build_parser().parse_args
    args = vars(parse([command, *(f"{option}={value}" for option, value in options.items())]))
    # compared whole: an option left out here (a new one) would come back with its default and fail the test
    assert args == {"command": command, **expected}
    assert vars(parse([command, *(str(x) for item in options.items() for x in item)])) == args  # --key value


def test_files_repeated_in_the_key_equals_value_form_are_all_read(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", NONEMPTY[:20])
    write_jsonl(tmp_path / "b.jsonl", NONEMPTY[20:])
    prepare(tmp_path, "text", f"--files={tmp_path / 'a.jsonl'}", f"--files={tmp_path / 'b.jsonl'}", "--dataset=ab",
            "--val_every=3", "--num_proc=1")
    out = tmp_path / "data/ab"
    assert sorted(read_bin(out / "train.bin") + read_bin(out / "val.bin")) == sorted(expected_tokens(NONEMPTY))


def test_a_file_matched_twice_is_read_once(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", NONEMPTY)
    path = str(tmp_path / "d.jsonl")
    prepare(tmp_path, "text", "--files", path, str(tmp_path / "*.jsonl"), path.replace("/d.jsonl", "/./d.jsonl"),
            "--dataset=d", "--val_every=3", "--num_proc=1")
    tokens = json.loads((tmp_path / "data/d/meta.json").read_text())["tokens"]
    assert tokens["train"] + tokens["val"] == len(expected_tokens(NONEMPTY))


@pytest.mark.parametrize("args, new", [
    (["text", "--files=a.txt", "--name=books"], "--dataset"),
    (["text", "--files", "a.txt", "--name", "books"], "--dataset"),
    (["fineweb", "--name=sample-10BT"], "--hf_config"),
])
def test_an_old_option_name_fails_in_one_line_that_names_the_new_one(tmp_path, capsys, args, new):
    assert f"--name is now {new}" in usage_error(capsys, tmp_path, *args)


def test_an_abbreviated_option_is_refused_as_gapt_py_refuses_it(tmp_path, capsys):
    assert "unrecognized arguments: --n_tr=500" in usage_error(capsys, tmp_path, "arithmetic", "--n_tr=500")


def test_help_shows_dataset_in_every_command_and_hf_config_in_fineweb_and_never_name(capsys):
    for command in EVERY_OPTION:
        with pytest.raises(SystemExit):
            prepare_data.build_parser().parse_args([command, "--help"])
        help_text = capsys.readouterr().out
        assert "--dataset DATASET" in help_text and "--name" not in help_text
        assert ("--hf_config HF_CONFIG" in help_text) == (command == "fineweb")


def test_the_command_suggested_for_a_missing_text_dataset_prepares_that_dataset():
    python, script, *args = shlex.split(prepare_data.prepare_command("books"))
    assert (python, script) == ("python", "prepare_data.py")
    assert prepare_data.build_parser().parse_args(args).dataset == "books"


@pytest.mark.parametrize("option", ["--max_tokens=0", "--val_tokens=-5", "--val_every=0", "--num_proc=0",
                                    "--max_tokens=1e9", "--n_train=0", "--n_val=ten", "--seed=-1"])
def test_a_count_that_is_not_a_whole_number_in_range_is_refused_naming_the_option(tmp_path, capsys, option):
    key, value = option.split("=")
    args = ["arithmetic", option] if key in ("--n_train", "--n_val", "--seed") else \
        ["text", "--files=a.txt", "--dataset=x", option]
    error = usage_error(capsys, tmp_path, *args)
    assert f"argument {key}: must be a whole number of at least" in error and repr(value) in error


# ---- the output folder: checked before anything is read, nothing left behind ----

@pytest.mark.parametrize("data_dir, dataset, file, option", [
    ("data", "x", "data", "--data_dir"),
    ("data/sub", "x", "data", "--data_dir"),
    ("data", "x", "data/x", "--dataset"),
])
def test_an_output_folder_in_the_place_of_a_file_is_a_one_line_error(tmp_path, data_dir, dataset, file, option):
    write_jsonl(tmp_path / "d.jsonl", NONEMPTY)
    (tmp_path / file).parent.mkdir(exist_ok=True)
    (tmp_path / file).write_text("a file")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit, match=f"is a file, not a folder, .*; choose another {option}$"):
        prepare_data.main(["text", f"--files={tmp_path / 'd.jsonl'}", f"--data_dir={tmp_path / data_dir}",
                           f"--dataset={dataset}"])
    assert sorted(tmp_path.rglob("*")) == before and (tmp_path / file).read_text() == "a file"


@pytest.mark.parametrize("below", ["", "new/deeper"])
def test_a_read_only_data_dir_is_refused_before_anything_runs(tmp_path, monkeypatch, below):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    access = os.access
    # as a read-only folder answers (chmod does not stop root)
    monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and path != str(read_only))
    with pytest.raises(SystemExit, match="is read-only, .* cannot be written; choose another --data_dir"):
        prepare_data.main(["arithmetic", f"--data_dir={read_only / below}"])
    assert list(read_only.iterdir()) == []


@pytest.mark.parametrize("option, message", [
    ("--dataset=a/b", "--dataset='a/b' is not a folder name"),
    ("--dataset=..", "--dataset='..' is not a folder name"),
    ("--dataset=", "--dataset='' is not a folder name"),
    ("--dataset=/abs", "--dataset='/abs' is not a folder name"),
    ("--data_dir=", "--data_dir is empty"),
    ("--data_dir=~/data", "--data_dir=~/data starts with '~', which the shell does not expand in --key=value"),
])
def test_an_output_folder_other_than_one_name_in_a_plain_data_dir_is_refused(tmp_path, monkeypatch, option, message):
    monkeypatch.chdir(tmp_path)  # where the default --data_dir, and an empty one, would write
    with pytest.raises(SystemExit, match=re.escape(message)):
        prepare_data.main(["arithmetic", "--n_train=10", "--n_val=10", option])
    assert list(tmp_path.iterdir()) == []


# ---- the input: each problem named where it is, with its fix ----

@pytest.mark.parametrize("suffix, good, bad", [
    (".txt", b"fine\n\ntext\n", b"also fine\n\ncaf\xe9 au lait\n"),
    (".jsonl", b'{"text": "fine"}\n', b'{"text": "fine"}\n{"text": "fine"}\n{"text": "caf\xe9"}\n'),
])
def test_a_file_that_is_not_utf8_is_named_with_its_line_and_how_to_convert_it(tmp_path, suffix, good, bad):
    (tmp_path / f"a{suffix}").write_bytes(good)
    (tmp_path / f"b{suffix}").write_bytes(bad)
    path = re.escape(str(tmp_path / f"b{suffix}"))
    with pytest.raises(SystemExit, match=f"{path} line 3 is not UTF-8 .* must be UTF-8. Convert it, e.g. "
                                         f"iconv -f latin1 -t utf-8 {path} > "):
        prepare(tmp_path, "text", f"--files={tmp_path}/*{suffix}", "--dataset=x", "--num_proc=1")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("line", ['{"text": broken', '["a list", "not an object"]'])
def test_a_jsonl_line_that_is_not_one_json_object_is_named_with_its_file_and_line(tmp_path, line):
    write_jsonl(tmp_path / "a.jsonl", NONEMPTY[:3])
    (tmp_path / "b.jsonl").write_text(f'{{"text": "fine"}}\n{line}\n')
    assert_fails(tmp_path, f"{tmp_path / 'b.jsonl'} line 2 is not a JSON object", "text",
                 f"--files={tmp_path}/*.jsonl", "--dataset=x", "--num_proc=1")


@pytest.mark.parametrize("texts, row", [([5, "fine"], 1), (["fine", "fine", 5], 3), (["fine", ["a", "list"]], 2)])
def test_a_row_whose_text_is_not_a_string_is_named_and_leaves_nothing_behind(tmp_path, texts, row):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    kind = type(texts[row - 1]).__name__
    assert_fails(tmp_path, f"row {row} of the input holds {kind} in column 'text', not text", "text",
                 f"--files={tmp_path / 'd.jsonl'}", "--dataset=x", "--num_proc=1")


def test_a_null_text_is_skipped_like_an_empty_document(tmp_path):
    pq.write_table(pa.table({"text": ["one", None, "two", "", "three"]}), tmp_path / "d.parquet")
    prepare(tmp_path, "text", f"--files={tmp_path / 'd.parquet'}", "--dataset=d", "--val_every=2", "--num_proc=1")
    assert read_bin(tmp_path / "data/d/val.bin") == expected_tokens(["one", "three"])
    assert read_bin(tmp_path / "data/d/train.bin") == expected_tokens(["two"])


def test_an_input_of_only_empty_documents_is_an_error_naming_that(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ["", "", ""])
    assert_fails(tmp_path, "every document in the input is empty", "text", f"--files={tmp_path / 'd.jsonl'}",
                 "--dataset=x", "--num_proc=1")


def test_a_file_that_cannot_be_read_is_named(tmp_path):
    (tmp_path / "gone.txt").symlink_to(tmp_path / "deleted.txt")  # no read permission does not stop root
    assert_fails(tmp_path, f"cannot read '{tmp_path / 'gone.txt'}' (a link to nothing, or no read permission)",
                 "text", f"--files={tmp_path}/*.txt", "--dataset=x")


def test_a_file_that_is_not_parquet_is_named(tmp_path):
    (tmp_path / "damaged.parquet").write_bytes(b"not parquet at all")
    assert_fails(tmp_path, f"{tmp_path / 'damaged.parquet'} is not a parquet file", "text",
                 f"--files={tmp_path / 'damaged.parquet'}", "--dataset=x")


def test_an_empty_parquet_file_adds_no_documents_and_only_empty_ones_are_an_error(tmp_path):
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "a_empty.parquet")
    pq.write_table(pa.table({"text": NONEMPTY}), tmp_path / "b_docs.parquet")
    prepare(tmp_path, "text", f"--files={tmp_path}/*.parquet", "--dataset=d", "--val_every=3", "--num_proc=1")
    tokens = json.loads((tmp_path / "data/d/meta.json").read_text())["tokens"]
    assert tokens["train"] + tokens["val"] == len(expected_tokens(NONEMPTY))
    empty = tmp_path / "only_empty"
    empty.mkdir()
    assert_fails(empty, "every parquet file in --files is empty", "text", f"--files={tmp_path / 'a_empty.parquet'}",
                 "--dataset=x")


def test_val_every_1_that_leaves_train_empty_names_two_fixes_and_both_work(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", NONEMPTY[:5])
    args = ["text", f"--files={tmp_path / 'd.jsonl'}", "--val_every=1", "--num_proc=1"]
    with pytest.raises(SystemExit) as e:
        prepare(tmp_path, *args, "--dataset=x")
    message = str(e.value)
    assert "the train split is empty" in message and "--max_tokens" not in message  # the input ran out, not the cap
    val_tokens = re.search(r"Raise --val_every, or lower --val_tokens to (\d+) or less", message).group(1)
    for fix in (f"--val_tokens={val_tokens}", "--val_every=2"):
        prepare(tmp_path, *args, fix, "--dataset=fixed")
        assert read_bin(tmp_path / "data/fixed/train.bin") != []


def test_max_tokens_used_up_by_the_first_document_says_to_raise_it(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", NONEMPTY)
    assert_fails(tmp_path, "Raise --max_tokens: the first document used it up", "text",
                 f"--files={tmp_path / 'd.jsonl'}", "--dataset=x", "--max_tokens=3", "--val_tokens=3", "--num_proc=1")


def test_a_malformed_hub_id_is_named_without_touching_the_network(tmp_path):
    assert_fails(tmp_path, "--hf_id='not a hub id' is not a Hub dataset id", "fineweb", "--hf_id=not a hub id",
                 "--max_tokens=1000", "--val_tokens=100")


def test_n_val_that_would_leave_train_no_pairs_to_draw_is_refused_in_our_format(tmp_path):
    assert_fails(tmp_path, "--n_val=1000001 leaves train almost no 1-3 digit pairs", "arithmetic", "--n_val=1000001")


# ---- as the user runs it: one line on stderr, exit status 1 ----

@pytest.mark.parametrize("problem", ["data_dir is a file", "a jsonl line is broken", "the first text is a number"])
def test_a_bad_input_prints_one_line_and_exits_1_instead_of_a_traceback(tmp_path, problem):
    """One line and nothing else: no traceback, no second line logged by datasets, no progress bar
    (what the first row shows is found before tokenizing starts)."""
    write_jsonl(tmp_path / "d.jsonl", NONEMPTY[:3])
    if problem == "data_dir is a file":
        (tmp_path / "data").write_text("a file")
    elif problem == "a jsonl line is broken":
        (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    else:
        (tmp_path / "d.jsonl").write_text('{"text": 5}\n{"text": "fine"}\n')
    result = cli(tmp_path, "text", "--files=d.jsonl", "--dataset=x")
    assert result.returncode == 1
    assert re.fullmatch(r"prepare_data\.py: [^\n]+\n", result.stderr), result.stderr


# -----------------------------------------------------------------------------
# Arithmetic answers, the paper's OOD metric: prepare_data.answer_scores and answer_ce_in_context,
# scored beside the format (gapt.py logs them, sample.py prints them)
# -----------------------------------------------------------------------------
class TableModel:
    """all_logits(idx)[b, t] = table[idx[b, t], t]: known logits that depend only on the token and its
    position, so the expected answer CE can be computed example by example, without any batching."""

    def __init__(self, vocab_size, length, seed=0):
        self.table = torch.randn(vocab_size, length, vocab_size, generator=torch.Generator().manual_seed(seed))

    def all_logits(self, idx):
        return self.table[idx, torch.arange(idx.size(1))]


class CopyModel:
    """Predicts, with certainty, the token `period` positions back (uniformly where there is none): a
    model that can answer only by reading an earlier example of a stream of identical examples."""

    def __init__(self, vocab_size, period):
        self.vocab_size, self.period = vocab_size, period

    def all_logits(self, idx):
        logits = torch.zeros(*idx.shape, self.vocab_size)
        logits[:, self.period - 1:] = 50.0 * F.one_hot(idx[:, :idx.size(1) - self.period + 1], self.vocab_size)
        return logits


class TokenModel:
    """The same logits at every position: the CE of a target depends on the target token only."""

    def __init__(self, vocab_size, seed=0):
        self.logits = torch.randn(vocab_size, generator=torch.Generator().manual_seed(seed))

    def all_logits(self, idx):
        return self.logits.expand(*idx.shape, -1)

    def ce(self, token):
        return -F.log_softmax(self.logits, -1)[token].item()


EXAMPLES = [encode_chars("\n" + line + "\n") for line in ("2*3=6", "9*9=81", "12*34=408", "7*0=0")]  # as split_examples gives them


def test_answer_ce_is_the_mean_ce_over_the_answer_digits_only():
    model = TableModel(len(ARITHMETIC_CHARS), length=16)
    losses = []
    for ex in EXAMPLES:  # direct computation: each answer digit j is predicted from position j - 1
        for j in range(ex.index(ARITH_EQ) + 1, len(ex) - 1):
            log_probs = F.log_softmax(model.table[ex[j - 1], j - 1], dim=-1)
            losses.append(-log_probs[ex[j]].item())
    assert len(losses) == 1 + 2 + 3 + 1  # the digits of 6, 81, 408, 0: no '=', no end-of-example token
    expected = sum(losses) / len(losses)
    assert prepare_data.answer_scores(model, EXAMPLES, ARITH_EQ, set(), "cpu")["answer_ce"] == pytest.approx(expected, rel=1e-5)
    assert prepare_data.answer_scores(model, EXAMPLES, ARITH_EQ, set(), "cpu", batch_size=3)["answer_ce"] == pytest.approx(expected, rel=1e-5)


def test_in_context_answer_ce_lets_an_answer_be_read_from_the_examples_before_it():
    examples = [encode_chars("\n2*3=6\n")] * 40
    model = CopyModel(len(ARITHMETIC_CHARS), period=6)  # 6 tokens per example in the stream
    assert prepare_data.answer_scores(model, examples, ARITH_EQ, set(), "cpu")["answer_ce"] == pytest.approx(math.log(len(ARITHMETIC_CHARS)))
    assert prepare_data.answer_ce_in_context(model, examples, ARITH_EQ, "cpu", window=16) < 1e-6


@pytest.mark.parametrize("window, batch_size", [(20, 64), (24, 3), (64, 1)])
def test_in_context_answer_ce_scores_every_whole_example_once_after_the_first_half_window(window, batch_size):
    rng = np.random.default_rng(window)
    examples = [EXAMPLES[i] for i in rng.integers(len(EXAMPLES), size=60)]
    model = TokenModel(len(ARITHMETIC_CHARS))
    stream_length = 1 + sum(len(ex) - 1 for ex in examples)
    last_window_end = (stream_length - window - 1) // (window // 2) * (window // 2) + window
    answers, end = [], 0  # end: the stream index of each example's closing eot
    for ex in examples:
        end += len(ex) - 1
        if window // 2 < end <= last_window_end:
            answers += ex[ex.index(ARITH_EQ) + 1:-1]
    expected = sum(model.ce(token) for token in answers) / len(answers)
    got = prepare_data.answer_ce_in_context(model, examples, ARITH_EQ, "cpu", window=window, batch_size=batch_size)
    assert got == pytest.approx(expected, rel=1e-6)


def test_in_context_answer_ce_is_nan_when_a_window_cannot_hold_two_of_the_longest_examples():
    model = TokenModel(len(ARITHMETIC_CHARS))
    assert math.isnan(prepare_data.answer_ce_in_context(model, EXAMPLES * 10, ARITH_EQ, "cpu", window=16))  # 12*34=408 is 10
    assert math.isnan(prepare_data.answer_ce_in_context(model, EXAMPLES[:1], ARITH_EQ, "cpu", window=64))  # not one window
    assert math.isfinite(prepare_data.answer_ce_in_context(model, EXAMPLES * 10, ARITH_EQ, "cpu", window=20))


# ---- Teacher-forced scores digit by digit, against CEs computed token by token ----

# products of 2, 3 and 4 digits: the first and the last digit are different digits of each
LINES = ("9*9=81", "12*34=408", "25*40=1000")
MULTI_DIGIT = [encode_chars("\n" + line + "\n") for line in LINES]
PRODUCTS = [line.split("=")[1] for line in LINES]


FORMATS = {"ours": (ARITHMETIC_CHARS, "\n{}*{}={}\n"), "author": (AUTHOR_TOKENS, "<eos><bos>{} x {} = {}<eos>")}


def digit_ids(vocabulary):
    return {i for i, token in enumerate(vocabulary) if token.isdigit()}


@pytest.mark.parametrize("form", ["ours", "author"])
@pytest.mark.parametrize("batch_size", [1, 3, 256])
def test_digit_positions_count_from_the_leading_digit_and_from_the_last_over_the_products_that_have_them(
        form, batch_size):
    vocabulary, template = FORMATS[form]
    encode, _ = sample.char_tokenizer(vocabulary)
    products = ["6", "81", "408", "1000"]
    examples = [encode(template.format(a, b, c)) for (a, b), c in zip([(2, 3), (9, 9), (12, 34), (25, 40)], products)]
    model = TokenModel(len(vocabulary))  # the CE of a target depends on the target token only
    ce = {digit: model.ce(vocabulary.index(digit)) for digit in "0123456789"}
    scores = prepare_data.answer_scores(model, examples, vocabulary.index("="), digit_ids(vocabulary), "cpu", batch_size)
    from_first = [statistics.fmean(ce[p[k]] for p in products if len(p) > k) for k in range(4)]
    from_last = [statistics.fmean(ce[p[-1 - k]] for p in products if len(p) > k) for k in range(4)]
    assert scores["answer_ce_from_first"] == pytest.approx(from_first, rel=1e-6)
    assert scores["answer_ce_from_last"] == pytest.approx(from_last, rel=1e-6)
    assert from_first != pytest.approx(from_last)  # the two ends tell different digits apart


@pytest.mark.parametrize("form", ["ours", "author"])
def test_the_end_token_is_scored_on_its_own_and_the_answer_ce_keeps_what_it_scored(form):
    vocabulary, template = FORMATS[form]
    encode, _ = sample.char_tokenizer(vocabulary)
    examples = [encode(template.format(12, 34, 408)), encode(template.format(9, 9, 81))]
    model = TokenModel(len(vocabulary))
    eq = vocabulary.index("=")
    scores = prepare_data.answer_scores(model, examples, eq, digit_ids(vocabulary), "cpu")
    end = vocabulary.index("\n" if form == "ours" else "<eos>")
    assert scores["end_ce"] == pytest.approx(model.ce(end), rel=1e-6)
    answers = [t for ex in examples for t in ex[ex.index(eq) + 1:-1]]  # the author's space after '=' too
    assert scores["answer_ce"] == pytest.approx(sum(map(model.ce, answers)) / len(answers), rel=1e-6)


def test_the_authors_space_after_the_equals_sign_is_no_digit_position():
    encode, _ = sample.char_tokenizer(AUTHOR_TOKENS)
    examples = [encode("<eos><bos>12 x 34 = 408<eos>")]
    scores = prepare_data.answer_scores(TokenModel(len(AUTHOR_TOKENS)), examples, AUTHOR_TOKENS.index("="),
                                digit_ids(AUTHOR_TOKENS), "cpu")
    assert len(scores["answer_ce_from_first"]) == len(scores["answer_ce_from_last"]) == len("408")


def test_the_scores_come_from_one_forward_pass_and_a_read_back_that_does_not_grow_with_the_batches(monkeypatch):
    """Each .item(), .tolist() or .cpu() of a tensor would make the CPU wait for a GPU."""
    reads = []

    def counted(real):
        def read(self, *args, **kwargs):
            reads.append(sys._getframe(1).f_code.co_filename == gapt.__file__)
            return real(self, *args, **kwargs)
        return read

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
    calls = []

    class CountedModel(TokenModel):
        def all_logits(self, idx):
            calls.append(len(idx))
            return super().all_logits(idx)

    counts = []
    for batch_size in (1, len(MULTI_DIGIT)):
        reads.clear()
        prepare_data.answer_scores(CountedModel(len(ARITHMETIC_CHARS)), MULTI_DIGIT, ARITH_EQ, digit_ids(ARITHMETIC_CHARS), "cpu",
                           batch_size)
        counts.append(sum(reads))
    assert counts[0] == counts[1]
    assert calls == [1] * len(MULTI_DIGIT) + [len(MULTI_DIGIT)]  # every example is read once per call


# -----------------------------------------------------------------------------
# Sampling and the arithmetic evaluation: sample.py
# -----------------------------------------------------------------------------
# ---- generating: a stop token and a tiny temperature ----

def test_generate_stops_once_every_row_has_emitted_the_stop_token():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # all logits equal: greedy picks token 0 every time
    out = sample.generate(model, torch.ones(2, 3, dtype=torch.long), max_new_tokens=10, temperature=0, stop_token=0)
    assert out.shape == (2, 4) and out[:, -1].tolist() == [0, 0]


def test_a_tiny_temperature_samples_the_greedy_token_instead_of_breaking():
    model = tiny_model()
    idx = torch.ones(2, 3, dtype=torch.long)
    greedy = sample.generate(model, idx, max_new_tokens=5, temperature=0)
    assert torch.equal(sample.generate(model, idx, max_new_tokens=5, temperature=1e-45), greedy)


# ---- exact match and greedy decoding, on a stub model that writes known answers ----

class Calculator:
    """Writes `answer(a, b)` after each '=', then the end-of-example token, then garbage ('7's) that
    must never reach the answer: a model whose greedy outputs are known. sample.generate drives it."""

    def __init__(self, answer):
        self.answer = answer
        self.config = gapt.GPTConfig(block_size=64)
        self.calls = 0

    def next_token(self, prefix):
        text = decode_chars(prefix).split("\n")[-1]  # the example being written
        if "=" not in text:
            return ARITHMETIC_CHARS.index("0")  # any token: only the answer digits are scored
        a, b = text[:text.index("=")].split("*")
        written, target = text[text.index("=") + 1:], self.answer(int(a), int(b)) + "\n"
        return ARITHMETIC_CHARS.index(target[len(written)] if len(written) < len(target) else "7")

    def logits_for(self, prefix):
        return 20.0 * F.one_hot(torch.tensor(self.next_token(prefix)), len(ARITHMETIC_CHARS)).float()

    def __call__(self, idx):
        self.calls += 1
        logits = torch.stack([self.logits_for(row) for row in idx.tolist()])
        return logits[:, None, :], None, None

    def all_logits(self, idx):
        return torch.stack([torch.stack([self.logits_for(row[:t + 1]) for t in range(len(row))])
                            for row in idx.tolist()])


def test_exact_match_is_one_for_right_answers_and_zero_for_wrong_ones():
    right = sample.evaluate_arithmetic(Calculator(lambda a, b: str(a * b)), EXAMPLES, ARITH_EQ, ARITH_EOT, decode_chars, "cpu")
    wrong = sample.evaluate_arithmetic(Calculator(lambda a, b: str((a * b + 1) * 10)), EXAMPLES, ARITH_EQ, ARITH_EOT, decode_chars, "cpu")
    assert right["examples"] == wrong["examples"] == len(EXAMPLES)
    assert right["exact_match"] == 1.0 and right["length_error"] == 0.0 == right["length_bias"]
    assert wrong["exact_match"] == 0.0 and wrong["length_error"] == 1.0 == wrong["length_bias"]  # a wrong digit and one digit too many
    assert right["answer_ce"] < 1e-6 < 1.0 < wrong["answer_ce"]


def test_length_bias_keeps_the_sign_the_length_error_drops():
    short = sample.evaluate_arithmetic(Calculator(lambda a, b: str(a * b)[:-1]), EXAMPLES, ARITH_EQ, ARITH_EOT, decode_chars, "cpu")
    long = sample.evaluate_arithmetic(Calculator(lambda a, b: str(a * b) + "0"), EXAMPLES, ARITH_EQ, ARITH_EOT, decode_chars, "cpu")
    assert short["length_error"] == long["length_error"] == 1.0  # one digit off either way
    assert short["length_bias"] == -1.0 and long["length_bias"] == 1.0  # answers that end too early, too late


def test_exact_match_is_broken_down_by_operand_digits():
    one_digit_only = Calculator(lambda a, b: str(a * b) if min(a, b) < 10 else "1")
    scores = sample.evaluate_arithmetic(one_digit_only, EXAMPLES, ARITH_EQ, ARITH_EOT, decode_chars, "cpu")
    assert scores["exact_match_by_digits"] == {"1x1": 1.0, "2x2": 0.0}
    assert scores["exact_match"] == 0.75  # 3 of the 4 examples are 1 x 1-digit products


def test_exact_match_by_digits_reads_the_operands_of_either_format():
    questions = ["12*3", "4*56", "<bos>12 x 3 ", "<bos>7 x 8 "]  # ours, and the author's `<bos>a x b = `
    assert sample.exact_match_by_digits(questions, [True, False, True, True]) == {"1x1": 1.0, "1x2": 2 / 3}


def test_greedy_decoding_stops_at_the_end_of_example_token():
    model = Calculator(lambda a, b: str(a * b))
    prompts = [ex[:ex.index(ARITH_EQ) + 1] for ex in EXAMPLES]
    answers = sample.greedy_answers(model, prompts, ARITH_EOT, "cpu")
    # 2*3= finishes one step before 9*9= in the same batch and then writes '7's: cut at its eot
    assert [decode_chars(a) for a in answers] == ["6", "81", "408", "0"]
    # prompts are batched by length; each batch stops once all its rows have written eot:
    # {2*3=, 9*9=, 7*0=}: 2 digits + eot = 3 steps; {12*34=}: 3 digits + eot = 4 steps (not 6)
    assert model.calls == 3 + 4


def test_a_model_that_never_stops_is_cut_after_as_many_tokens_as_its_prompt():
    model = Calculator(lambda a, b: "1" * 50)
    answers = sample.greedy_answers(model, [encode_chars("2*3=")], ARITH_EOT, "cpu")
    assert answers == [encode_chars("1111")]


# ---- Calculators that err at known digits: the teacher-forced and the greedy scores say where ----

# the CE of a token the Calculator does not pick (it puts a logit of 20 on the one it picks)
WRONG = -F.log_softmax(20.0 * F.one_hot(torch.tensor(0), len(ARITHMETIC_CHARS)).float(), -1)[1].item()


def scores_of(model):
    return sample.evaluate_arithmetic(model, MULTI_DIGIT, ARITH_EQ, ARITH_EOT, decode_chars, "cpu")


def share_with(k, products):
    """The share of the products of k digits or more that have exactly k: those whose k-th digit from
    either end is the digit at the other end."""
    return sum(len(p) == k for p in products) / sum(len(p) >= k for p in products)


def test_a_calculator_wrong_only_in_the_last_digit_is_scored_wrong_there_and_right_everywhere_else():
    scores = scores_of(Calculator(lambda a, b: str(a * b)[:-1] + str((a * b + 1) % 10)))
    assert scores["answer_ce_from_last"] == pytest.approx([WRONG, 0, 0, 0], abs=1e-6)
    # from the leading digit, the last one is the second of 81, the third of 408, the fourth of 1000
    assert scores["answer_ce_from_first"] == pytest.approx([WRONG * share_with(k, PRODUCTS) for k in (1, 2, 3, 4)],
                                                           abs=1e-6)
    assert scores["end_ce"] < 1e-6
    assert scores["last_digit_accuracy"] == 0 and scores["leading_digit_accuracy"] == 1
    assert scores["leading_two_digits_accuracy"] == pytest.approx(2 / 3)  # 81 ends in its second digit


def test_a_calculator_wrong_only_in_the_leading_digit_is_scored_wrong_there_and_right_everywhere_else():
    scores = scores_of(Calculator(lambda a, b: str(int(str(a * b)[0]) % 9 + 1) + str(a * b)[1:]))
    assert scores["answer_ce_from_first"] == pytest.approx([WRONG, 0, 0, 0], abs=1e-6)
    assert scores["answer_ce_from_last"] == pytest.approx([WRONG * share_with(k, PRODUCTS) for k in (1, 2, 3, 4)],
                                                          abs=1e-6)
    assert scores["end_ce"] < 1e-6
    assert scores["leading_digit_accuracy"] == 0 == scores["leading_two_digits_accuracy"]
    assert scores["last_digit_accuracy"] == 1


def test_a_calculator_right_in_every_digit_that_never_stops_is_scored_wrong_only_at_the_end_token():
    scores = scores_of(Calculator(lambda a, b: str(a * b) + "7" * 50))
    assert scores["end_ce"] == pytest.approx(WRONG, abs=1e-6)
    assert max(scores["answer_ce_from_first"] + scores["answer_ce_from_last"]) < 1e-6
    assert scores["answer_ce"] < 1e-6  # the end token is no answer digit
    assert scores["leading_digit_accuracy"] == 1 == scores["leading_two_digits_accuracy"]
    assert scores["exact_match"] == 0 and scores["length_bias"] > 0


def test_a_right_calculator_gets_every_digit_right():
    scores = scores_of(Calculator(lambda a, b: str(a * b)))
    assert max([scores["answer_ce"], scores["end_ce"], *scores["answer_ce_from_first"],
                *scores["answer_ce_from_last"]]) < 1e-6
    assert len(scores["answer_ce_from_first"]) == len(scores["answer_ce_from_last"]) == max(map(len, PRODUCTS))
    assert scores["leading_digit_accuracy"] == scores["leading_two_digits_accuracy"] == scores["last_digit_accuracy"] == 1


def test_the_leading_two_digits_of_a_one_digit_product_are_right_only_if_the_answer_stops_after_it():
    one_digit = [encode_chars("\n2*3=6\n")]
    stops = sample.evaluate_arithmetic(Calculator(lambda a, b: str(a * b)), one_digit, ARITH_EQ, ARITH_EOT,
                                       decode_chars, "cpu")
    goes_on = sample.evaluate_arithmetic(Calculator(lambda a, b: str(a * b) + "1"), one_digit, ARITH_EQ, ARITH_EOT,
                                         decode_chars, "cpu")
    assert stops["leading_two_digits_accuracy"] == 1 and goes_on["leading_two_digits_accuracy"] == 0
    assert goes_on["leading_digit_accuracy"] == 1


class Script:
    """Writes tokens[t + 1] at position t, whatever it reads: a model whose greedy answer is known in
    any vocabulary (the Calculator writes ours only)."""

    def __init__(self, tokens, vocab_size):
        self.logits = 20.0 * F.one_hot(torch.tensor(tokens[1:]), vocab_size).float()  # (len(tokens) - 1, vocab)
        self.config = gapt.GPTConfig(block_size=64)

    def __call__(self, idx):
        return self.logits[idx.size(1) - 1].expand(idx.size(0), 1, -1), None, None

    def all_logits(self, idx):
        return self.logits[:idx.size(1)].expand(idx.size(0), -1, -1)


@pytest.mark.parametrize("written, leading, last", [(" 56", 1, 1), (" 66", 0, 1), (" 57", 1, 0)])
def test_the_greedy_digits_of_the_authors_format_are_read_after_its_space(written, leading, last):
    encode, decode = sample.char_tokenizer(AUTHOR_TOKENS)
    truth = encode("<eos><bos>7 x 8 = 56<eos>")
    model = Script(encode(f"<eos><bos>7 x 8 ={written}<eos>"), len(AUTHOR_TOKENS))
    scores = sample.evaluate_arithmetic(model, [truth], AUTHOR_TOKENS.index("="), AUTHOR_TOKENS.index("<eos>"),
                                        decode, "cpu")
    assert scores["leading_digit_accuracy"] == leading and scores["last_digit_accuracy"] == last
    assert len(scores["answer_ce_from_first"]) == 2  # 5 and 6, not the space


# ---- tiny trained checkpoints, one per dataset kind, trained once for the whole file ----

TINY_RUN = dict(n_layer=3, n_head=2, n_embd=16, block_size=32, patch_size=8, batch_size=4,
                gradient_accumulation_steps=1, mbe_skip_first=1, mbe_skip_last=1, compile=False, device="cpu",
                max_iters=3, eval_interval=3, eval_iters=1, log_interval=1, align_interval=0, warmup_iters=1,
                lr_decay_iters=3, answer_eval_examples=20, mode="baseline")


def train_tiny(data_dir, out_dir, dataset):
    settings = {**TINY_RUN, "dataset": dataset, "data_dir": data_dir, "out_dir": out_dir}
    gapt.train(gapt.load_config([f"--{k}={v}" for k, v in settings.items()]))
    return str(out_dir)


@pytest.fixture(scope="module")
def arith_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("arith")
    prepare_data.main(["arithmetic", "--n_train", "2000", "--n_val", "50", "--data_dir", str(root / "data")])
    return dict(data_dir=str(root / "data"), out_dir=train_tiny(root / "data", root / "out", "arithmetic"))


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A GPT-2 BPE dataset written by hand in prepare_data.py's layout (documents end with eot)."""
    root = tmp_path_factory.mktemp("text")
    folder = root / "data" / "story"
    folder.mkdir(parents=True)
    enc = tiktoken.get_encoding("gpt2")
    document = enc.encode_ordinary("Once upon a time there was a tiny model that learned to count. ") + [enc.eot_token]
    counts = {}
    for split, repeats in (("train", 40), ("val", 10)):
        tokens = np.array(document * repeats, dtype=np.uint16)
        tokens.tofile(folder / f"{split}.bin")
        counts[split] = len(tokens)
    meta = dict(tokenizer="gpt2", vocab_size=enc.n_vocab, eot_token=enc.eot_token, dtype="uint16", tokens=counts)
    (folder / "meta.json").write_text(json.dumps(meta))
    return dict(data_dir=str(root / "data"), out_dir=train_tiny(root / "data", root / "out", "story"))


@pytest.fixture(scope="module")
def author_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("author")
    prepare_data.main(["arithmetic", "--format", "author", "--n_train", "2000", "--n_val", "50",
                       "--data_dir", str(root / "data")])
    return dict(data_dir=str(root / "data"), out_dir=train_tiny(root / "data", root / "out", "arithmetic"))


# ---- the training log and sample.py, in both formats ----

@pytest.mark.parametrize("run", ["arith_run", "author_run"])
def test_the_training_log_holds_the_teacher_forced_digit_scores_sample_py_reports(run, request, capsys):
    run = request.getfixturevalue(run)
    n = TINY_RUN["answer_eval_examples"]  # the examples the training log scored
    rows = sample.main([f"--out_dir={run['out_dir']}", "--eval=arithmetic", f"--n={n}", "--device=cpu"])
    out = capsys.readouterr().out
    logged = [r for r in log_rows(run["out_dir"]) if r.get("event") == "eval"][-1]
    meta = prepare_data.read_meta(run["data_dir"], "arithmetic")
    _, decode = sample.char_tokenizer(meta["tokenizer"])
    for row in rows:
        examples = prepare_data.answer_sets(run["data_dir"], "arithmetic", meta, n)[row["split"]][0]
        longest = max(len(re.search(r"= ?(\d+)", decode(ex)).group(1)) for ex in examples)
        for key in ("answer_ce_from_first", "answer_ce_from_last", "end_ce"):
            assert row[key] == pytest.approx(logged[f"{row['split']}_{key}"], rel=1e-5)
        assert len(row["answer_ce_from_first"]) == len(row["answer_ce_from_last"]) == longest
        assert all(math.isfinite(v) for v in row["answer_ce_from_first"] + row["answer_ce_from_last"])
        assert all(0 <= row[f"{digits}_accuracy"] <= 1 for digits in ("leading_digit", "leading_two_digits", "last_digit"))
        assert f"{row['split']}_leading_digit_accuracy" not in logged  # greedy decoding is for sample.py only
    written = json.loads(open(os.path.join(run["out_dir"], "eval_arithmetic.json")).read())
    assert written["rows"] == rows
    assert "| end CE | length error | length bias | leading digit | leading 2 digits | last digit |" in out
    assert "answer CE per digit of the product, counted from the first digit" in out
    assert "answer CE per digit of the product, counted from the last digit" in out


def test_eval_answer_ce_is_the_one_logged_in_training(arith_run):
    """sample.py's answer CE on the first answer_eval_examples examples is gapt.py's val_answer_ce."""
    rows = sample.main([f"--out_dir={arith_run['out_dir']}", "--eval=arithmetic", "--n=20", "--device=cpu"])
    logged = [row for row in log_rows(arith_run["out_dir"]) if row.get("event") == "eval"][-1]
    assert rows[0]["answer_ce"] == pytest.approx(logged["val_answer_ce"], rel=1e-5)
    assert rows[1]["answer_ce"] == pytest.approx(logged["val_ood_answer_ce"], rel=1e-5)
    assert rows[2]["answer_ce"] == pytest.approx(logged["test_ood_answer_ce"], rel=1e-5)
    assert rows[0]["answer_ce_in_context"] == pytest.approx(logged["val_answer_ce_in_context"], rel=1e-5)
    assert "answer_ce_in_context" not in rows[1] and "val_ood_answer_ce_in_context" not in logged  # 32 < 2 x 19


def test_eval_val_scores_every_whole_window_of_the_val_split_once(text_run, capsys):
    """The whole split in consecutive windows, the tail shorter than a window left out, each window
    weighted alike however the batches split them: the CE over all its next tokens at once, and each
    block's patch MBE as training's log defines it."""
    result = sample.main([f"--out_dir={text_run['out_dir']}", "--eval=val", "--device=cpu"])
    model, _ = sample.load_model(text_run["out_dir"], "cpu")
    tokens = np.fromfile(os.path.join(text_run["data_dir"], "story", "val.bin"), dtype=np.uint16).astype(np.int64)
    T = model.config.block_size
    n = (len(tokens) - 1) // T
    assert n >= 4 and result["tokens"] == n * T  # 150 tokens: four windows of 32, and a tail
    x = torch.from_numpy(tokens[:n * T]).view(n, T)
    y = torch.from_numpy(tokens[1:n * T + 1]).view(n, T)
    with torch.no_grad():
        ce = F.cross_entropy(model.all_logits(x).flatten(0, 1), y.flatten())
        _, measures = model.trunk(x, lambda h: gapt.patch_spectrum(h, model.config.patch_size)[0])
    assert result["ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert result["mbe_blocks"] == pytest.approx([m.item() for m in measures], rel=1e-4)
    assert result["mbe_all"] == pytest.approx(np.mean(result["mbe_blocks"]))
    unequal_batches = sample.evaluate_split(model, tokens, "cpu", batch_size=3)  # 3 windows, then 1
    assert unequal_batches["ce"] == pytest.approx(result["ce"], rel=1e-5)
    written = json.loads(open(os.path.join(text_run["out_dir"], "eval_val.json")).read())
    assert written["ce"] == result["ce"] and written["iter_num"] == 3 and "--eval=val" in written["command"]
    assert f"{n * T} tokens: CE {result['ce']:.4f}" in capsys.readouterr().out


# ---- sampling from tiny trained checkpoints ----

def test_sampling_is_deterministic_for_a_fixed_seed_and_returns_text(arith_run):
    args = [f"--out_dir={arith_run['out_dir']}", "--start=12*3", "--num_samples=2", "--max_new_tokens=20",
            "--temperature=1.0", "--device=cpu", "--stop_at_end=False"]
    first, again = sample.main(args + ["--seed=1"]), sample.main(args + ["--seed=1"])
    assert first == again
    assert len(first) == 2 and all(isinstance(s, str) and s.startswith("12*3") and len(s) == 24 for s in first)
    assert sample.main(args + ["--seed=2"]) != first


def test_sampling_reads_the_prompt_from_a_file_and_greedy_is_seed_free(arith_run, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("7*8=")
    args = [f"--out_dir={arith_run['out_dir']}", f"--start=FILE:{prompt}", "--num_samples=1", "--max_new_tokens=5",
            "--temperature=0", "--device=cpu"]
    greedy = sample.main(args + ["--seed=1"])
    assert greedy == sample.main(args + ["--seed=2"]) and greedy[0].startswith("7*8=")


def test_a_text_checkpoint_samples_with_gpt2_bpe(text_run):
    samples = sample.main([f"--out_dir={text_run['out_dir']}", "--start=Once upon", "--num_samples=2",
                           "--max_new_tokens=8", "--device=cpu"])
    assert len(samples) == 2 and all(s.startswith("Once upon") for s in samples)


def test_eval_arithmetic_prints_and_writes_the_table(arith_run, capsys):
    rows = sample.main([f"--out_dir={arith_run['out_dir']}", "--eval=arithmetic", "--n=6", "--device=cpu"])
    assert [r["split"] for r in rows] == ["val", "val_ood", "test_ood"]
    for r in rows:
        assert r["examples"] == 6 and 0 <= r["exact_match"] <= 1 and r["answer_ce"] > 0 and r["length_error"] >= 0
    written = json.loads(open(os.path.join(arith_run["out_dir"], "eval_arithmetic.json")).read())
    assert written["rows"] == rows and written["dataset"] == "arithmetic" and written["iter_num"] == 3
    assert "| val_ood | 6 |" in capsys.readouterr().out


# ---- a sample ends where the model ends its document or example ----

def memorizer(run, out_dir, tokens, **config):
    """A checkpoint with run's config (changed by `config`) whose model, greedy, continues any prefix of
    `tokens` with the rest of them: it reads positions only. Each token used embeds as a basis vector,
    position t as (4 x) the one of tokens[t + 1], and the blocks add nothing to the residual stream."""
    checkpoint = torch.load(os.path.join(run["out_dir"], "ckpt.pt"), weights_only=True)
    checkpoint["config"].update(config)
    model = gapt.GPT(gapt.GPTConfig(**{k: checkpoint["config"][k] for k in gapt.MODEL_KEYS}))
    basis = {token: i for i, token in enumerate(sorted(set(tokens)))}
    with torch.no_grad():
        model.wte.weight.zero_()
        model.wpe.weight.zero_()
        for token, i in basis.items():
            model.wte.weight[token, i] = 1.0
        for t, token in enumerate(tokens[1:]):
            model.wpe.weight[t, basis[token]] = 4.0
        for block in model.blocks:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
    os.makedirs(out_dir)
    gapt.save_checkpoint(os.path.join(out_dir, "ckpt.pt"), {**checkpoint, "model": model.state_dict()})
    return str(out_dir)


def greedy(out_dir, *args):
    return sample.main([f"--out_dir={out_dir}", "--temperature=0", "--num_samples=1", "--device=cpu", *args])


def block_size(run):
    return torch.load(os.path.join(run["out_dir"], "ckpt.pt"), weights_only=True)["config"]["block_size"]


def examples_of(run, split, n):
    meta = prepare_data.read_meta(run["data_dir"], "arithmetic")
    return prepare_data.answer_sets(run["data_dir"], "arithmetic", meta, n)[split][0]


def test_an_arithmetic_sample_ends_at_the_end_of_its_example_unless_told_to_write_on(arith_run, tmp_path):
    tokens = encode_chars("\n7*8=56\n9*9=81\n")
    out_dir = memorizer(arith_run, tmp_path / "out", tokens)
    everything = f"--max_new_tokens={len(tokens) - 1}"  # the default prompt is the leading end token
    assert greedy(out_dir, everything) == [decode_chars(tokens[1:tokens.index(tokens[0], 1)])]  # 7*8=56
    assert greedy(out_dir, everything, "--stop_at_end=False") == [decode_chars(tokens[1:])]


def test_a_text_sample_ends_at_the_end_of_its_document_and_prints_no_end_marker(text_run, tmp_path, capsys):
    enc = tiktoken.get_encoding("gpt2")
    prompt, line = enc.encode_ordinary("ROMEO:"), enc.encode_ordinary(" I am here.")
    tokens = [*prompt, *line, enc.eot_token, *enc.encode_ordinary(" JULIET:")]
    out_dir = memorizer(text_run, tmp_path / "out", tokens)
    everything = f"--max_new_tokens={len(tokens) - len(prompt)}"
    assert greedy(out_dir, "--start=ROMEO:", everything) == ["ROMEO:" + enc.decode(line)]
    assert "<|endoftext|>" not in capsys.readouterr().out
    assert (greedy(out_dir, "--start=ROMEO:", everything, "--stop_at_end=False")
            == ["ROMEO:" + enc.decode(tokens[len(prompt):])])
    assert "<|endoftext|> JULIET:" in capsys.readouterr().out


def test_sampled_text_never_runs_through_the_end_of_an_example(arith_run):
    samples = sample.main([f"--out_dir={arith_run['out_dir']}", "--start=12*3", "--num_samples=8",
                           "--max_new_tokens=30", "--temperature=2.0", "--device=cpu"])
    assert len(samples) == 8 and not any("\n" in s for s in samples)


def author_data(tmp_path):
    prepare_data.main(["arithmetic", "--format", "author", "--n_train", "100", "--n_val", "20",
                       "--data_dir", str(tmp_path / "author")])
    return str(tmp_path / "author")


def test_the_default_prompt_starts_an_example_of_the_authors_format_and_spelled_tokens_are_read(arith_run, tmp_path):
    bos, eos = AUTHOR_TOKENS.index("<bos>"), AUTHOR_TOKENS.index("<eos>")
    example = [bos] + [AUTHOR_TOKENS.index(c) for c in "7 x 8 = 56"] + [eos]
    out_dir = memorizer(arith_run, tmp_path / "out", [eos, *example], vocab_size=len(AUTHOR_TOKENS),
                        data_dir=author_data(tmp_path))
    text = "".join(AUTHOR_TOKENS[i] for i in example[:-1])  # <bos>7 x 8 = 56
    assert greedy(out_dir) == [text]
    question = "<eos>" + text[:text.index("=") + 2]  # <eos><bos>7 x 8 = : one position per token
    assert greedy(out_dir, f"--start={question}") == ["<eos>" + text]


def test_a_prompt_outside_the_authors_vocabulary_is_told_the_characters_it_can_use(arith_run, tmp_path):
    out_dir = memorizer(arith_run, tmp_path / "out", [0, 1], vocab_size=len(AUTHOR_TOKENS),
                        data_dir=author_data(tmp_path))
    with pytest.raises(SystemExit) as stop:
        greedy(out_dir, "--start=12+3")
    message = str(stop.value.code)
    assert "'+'" in message and repr("".join(c for c in AUTHOR_TOKENS if len(c) == 1)) in message
    assert "<bos><eos>" not in message


# ---- greedy decoding and the prompt ----

def test_greedy_decoding_prints_one_sample_and_says_why(arith_run, capsys):
    samples = sample.main([f"--out_dir={arith_run['out_dir']}", "--start=12*3", "--num_samples=3",
                           "--temperature=0", "--device=cpu"])
    out = capsys.readouterr().out
    assert len(samples) == 1 and out.count("---------------") == 1
    assert "greedily, which gives one sample, not 3" in out


def test_a_prompt_file_is_read_without_the_newline_that_ends_it(arith_run, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("12*3=\n")
    assert greedy(arith_run["out_dir"], f"--start=FILE:{prompt}") == greedy(arith_run["out_dir"], "--start=12*3=")


def test_a_prompt_longer_than_the_models_window_is_said_to_be_cut(arith_run, capsys):
    prompt = "1*2=2\n" * 10
    greedy(arith_run["out_dir"], f"--start={prompt}", "--max_new_tokens=1")
    out = capsys.readouterr().out
    assert f"the prompt is {len(prompt)} tokens; the model reads only the last {block_size(arith_run)}" in out


# ---- --eval=arithmetic says what it scored, and why a number is missing ----

def evaluate(run, n, capsys):
    rows = sample.main([f"--out_dir={run['out_dir']}", "--eval=arithmetic", f"--n={n}", "--device=cpu"])
    return rows, capsys.readouterr().out


def test_eval_with_n_beyond_a_split_says_how_many_examples_it_scored(arith_run, capsys):
    held = len(examples_of(arith_run, "val", 10**9))
    rows, out = evaluate(arith_run, 100 * held, capsys)
    assert all(r["examples"] == held for r in rows)
    assert f"first {held} examples of val" in out and f"n={100 * held} is capped" in out
    assert f"{100 * held} examples" not in out


def test_eval_says_why_the_answer_ce_in_context_is_missing(arith_run, capsys):
    rows, out = evaluate(arith_run, 6, capsys)
    longest = max(len(ex) for ex in examples_of(arith_run, "val_ood", 6)) - 1  # in the stream: no leading eot
    assert "answer_ce_in_context" in rows[0] and "val: no answer CE in context" not in out
    assert "answer_ce_in_context" not in rows[1]
    assert (f"val_ood: no answer CE in context: the model's window ({block_size(arith_run)} tokens) must hold "
            f"two of the longest examples ({longest} tokens each)") in out
    rows, out = evaluate(arith_run, 1, capsys)
    assert "answer_ce_in_context" not in rows[0]
    assert "val: no answer CE in context: the examples scored fill less than one window" in out


def test_eval_into_a_folder_it_cannot_write_stops_before_scoring(arith_run, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(os.path.join(arith_run["out_dir"], "ckpt.pt"), run)
    monkeypatch.setattr(sample.os, "access", lambda path, mode: False)  # as a read-only folder answers
    with pytest.raises(SystemExit, match="is not writable; copy the run"):
        sample.main([f"--out_dir={run}", "--eval=arithmetic", "--device=cpu"])
    assert capsys.readouterr().out == "" and os.listdir(run) == ["ckpt.pt"]


# ---- bad input: one line naming the problem and the fix, before anything is generated or written ----

def test_sample_refuses_a_negative_top_k_and_a_prompt_file_that_is_not_utf8(tmp_path):
    with pytest.raises(SystemExit, match="top_k must be >= 0"):
        sample.load_sample_config(["--top_k=-5"])
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"caf\xe9")
    with pytest.raises(SystemExit, match="not UTF-8"):
        sample.read_prompt(f"FILE:{prompt}")


@pytest.mark.parametrize("args, message", [
    (["--out_dir={run}/ckpt.pt"], "is a file; point --out_dir at the folder of a run"),
    (["--start=FILE:"], "--start=FILE: names no file"),
    (["--start=FILE:{empty}"], "is empty; write the prompt into it"),
    (["--seed=18446744073709551616"], r"seed must be in \[0, 2\*\*64\)"),
    (["--device=cuda"], "no CUDA device; use --device=cpu"),
    (["--eval=arithmetic", "--n=0"], "n must be positive"),
    (["--threads=-1"], r"threads must be >= 0 \(0 = auto"),
    (["--eval=arithmetic", "--temperature=0"], "reads no sampling option, but got --temperature"),
    (["--n=5"], "--n=5 counts the examples of --eval=arithmetic"),
    (["--eval=val", "--n=5"], "--n=5 counts the examples of --eval=arithmetic"),
    (["--eval=val", "--top_k=5"], "--eval=val reads no sampling option, but got --top_k"),
    (["--eval=text"], "eval must be '' \\(sample\\), 'arithmetic' or 'val'"),
    (["--out_dir={foreign}"], "the checkpoint was trained on another dataset; point --data_dir"),
    (["--out_dir={foreign}", "--eval=arithmetic"], "the checkpoint was trained on another dataset; point --data_dir"),
])
def test_bad_input_stops_with_one_line_and_writes_nothing(arith_run, tmp_path, monkeypatch, args, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without CUDA
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(os.path.join(arith_run["out_dir"], "ckpt.pt"), run)
    (tmp_path / "empty.txt").write_text("")
    # the author's vocabulary has 15 tokens, ours 13: a model of 15 cannot read our data
    foreign = memorizer(arith_run, tmp_path / "foreign", [0, 1], vocab_size=len(AUTHOR_TOKENS))
    paths = dict(run=run, empty=tmp_path / "empty.txt", foreign=foreign)
    with pytest.raises(SystemExit, match=message) as stop:
        sample.main([f"--out_dir={run}", "--device=cpu", *(a.format(**paths) for a in args)])
    assert "\n" not in str(stop.value.code)
    assert os.listdir(run) == ["ckpt.pt"] and os.listdir(foreign) == ["ckpt.pt"]


@pytest.mark.parametrize("damage, message", [
    ("truncated", "is not a readable checkpoint"), ("foreign", "is not a gapt.py checkpoint"),
    ("other weights", "weights do not fit"), ("config without its model keys", "no config\\['n_layer'\\]"),
])
def test_a_damaged_checkpoint_tells_the_sampler_how_to_train_one(arith_run, tmp_path, damage, message):
    path = tmp_path / "ckpt.pt"
    checkpoint = torch.load(os.path.join(arith_run["out_dir"], "ckpt.pt"), weights_only=True)
    if damage == "truncated":
        path.write_bytes(open(os.path.join(arith_run["out_dir"], "ckpt.pt"), "rb").read()[:2000])
    elif damage == "foreign":
        torch.save(dict(weights=torch.zeros(3)), path)
    elif damage == "other weights":
        torch.save({**checkpoint, "config": {**checkpoint["config"], "n_layer": 4}}, path)  # a block the weights lack
    else:
        torch.save({**checkpoint, "config": {k: v for k, v in checkpoint["config"].items() if k != "n_layer"}}, path)
    with pytest.raises(SystemExit, match=message) as stopped:
        sample.main([f"--out_dir={tmp_path}", "--device=cpu"])
    assert f"train one with python gapt.py --out_dir={tmp_path}" in str(stopped.value.code)
    assert "init_from" not in str(stopped.value.code)


@pytest.mark.parametrize("args, message", [
    (["--out_dir={tmp}/nowhere"], "no checkpoint at"),
    (["--out_dir={text}", "--eval=arithmetic"], "needs a model trained on arithmetic data"),
    (["--out_dir={arith}", "--start=12+3="], "outside the model's vocabulary: '+'"),
    (["--out_dir={arith}", "--eval=arithmetic", "--data_dir={tmp}"], "--eval=arithmetic needs"),
    (["--out_dir={arith}", "--data_dir={tmp}"], "too small for GPT-2 BPE"),
    (["--out_dir={arith}", "--start=FILE:{tmp}/missing.txt"], "prompt file"),
    (["--out_dir={arith}", "--eval=geometry"], "eval must be"),
    (["--out_dir={arith}", "--colour=blue"], "unknown config key 'colour'"),
    (["--out_dir={arith}", "--n", "5"], "write overrides as --key=value"),
    (["--out_dir={arith}", "--num_samples=0"], "num_samples must be positive"),
])
def test_bad_input_stops_with_a_clear_message(arith_run, text_run, tmp_path, args, message):
    paths = dict(tmp=tmp_path, arith=arith_run["out_dir"], text=text_run["out_dir"])
    with pytest.raises(SystemExit) as stop:
        sample.main([a.format(**paths) for a in args] + ["--device=cpu"])
    assert message in str(stop.value.code)


def test_the_dataset_without_val_ood_is_named(arith_run, tmp_path):
    data = tmp_path / "data" / "arithmetic"
    data.mkdir(parents=True)
    source = os.path.join(arith_run["data_dir"], "arithmetic")
    for name in ("meta.json", "val.bin"):
        (data / name).write_bytes(open(os.path.join(source, name), "rb").read())
    with pytest.raises(SystemExit, match="has no .*val_ood.bin; prepare it with: python prepare_data.py arithmetic"):
        sample.main([f"--out_dir={arith_run['out_dir']}", "--eval=arithmetic", f"--data_dir={tmp_path / 'data'}"])


# ---- as the user runs it: one line on stderr naming sample.py, a non-zero exit ----

@pytest.mark.parametrize("arg, message", [
    ("--colour=blue", "sample.py: unknown config key 'colour'"),
    ("--top_k=0", "sample.py: no checkpoint at"),
])
def test_command_line_errors_exit_nonzero_naming_sample_py(tmp_path, arg, message):
    done = run_program([sys.executable, os.path.abspath(sample.__file__), f"--out_dir={tmp_path}", arg], timeout=120)
    assert done.returncode != 0 and message in done.stderr


# -----------------------------------------------------------------------------
# The conflicting-memories toy (experiments/forgetting.py)
# -----------------------------------------------------------------------------
def toy_config(**overrides):
    # few steps and short patience so the gate really switches within the run
    return forgetting.load_config([f"--{k}={v}" for k, v in dict(
        steps=16, eval_interval=8, n_eval=64, patience_mem=2, patience_comp=2, **overrides).items()])


def test_forgetting_tasks_have_expected_shapes_and_mirrored_inputs():
    tasks = forgetting.make_forgetting_tasks(0, n_train=320, n_eval=1000)
    for task in (1, 2):
        assert tasks[f"x{task}_train"].shape == (320, 10) and tasks[f"y{task}_train"].shape == (320, 10)
        assert tasks[f"x{task}_eval"].shape == (1000, 10) and tasks[f"y{task}_eval"].shape == (1000, 10)
    assert tasks["theta0"]["fc.weight"].shape == (20, 10) and tasks["theta0"]["proj.weight"].shape == (10, 20)
    m1, m2 = tasks["x1_eval"].mean(0), tasks["x2_eval"].mean(0)
    ones, zeros = torch.ones(5), torch.zeros(5)
    assert torch.allclose(m1[:5], ones, atol=0.05) and torch.allclose(m1[5:], zeros, atol=0.05)
    assert torch.allclose(m2[:5], zeros, atol=0.05) and torch.allclose(m2[5:], ones, atol=0.05)
    assert abs(tasks["x1_eval"][:, 0].std().item() - 0.25) < 0.03


def test_same_seed_gives_identical_tasks_and_other_seed_differs():
    a, b = forgetting.make_forgetting_tasks(3, n_train=64), forgetting.make_forgetting_tasks(3, n_train=64)
    c = forgetting.make_forgetting_tasks(4, n_train=64)
    for k in a:
        if k == "theta0":
            assert all(torch.equal(a[k][n], b[k][n]) for n in a[k])
        else:
            assert torch.equal(a[k], b[k])
    assert not torch.equal(a["y1_train"], c["y1_train"])


def test_eval_set_does_not_depend_on_training_stream_length():
    short, long = forgetting.make_forgetting_tasks(0, n_train=64), forgetting.make_forgetting_tasks(0, n_train=640)
    assert torch.equal(short["x2_eval"], long["x2_eval"])


def test_shift_is_low_rank_and_scaled_between_half_and_five_times_the_weights():
    theta = forgetting.random_init(torch.Generator().manual_seed(0))
    dtheta = forgetting.random_shift(theta, torch.Generator().manual_seed(1))
    for name, p in theta.items():
        ratio = (dtheta[name].norm() / p.norm()).item()
        assert 0.5 <= ratio <= 5.0
        if p.dim() == 2:
            assert torch.linalg.matrix_rank(dtheta[name]).item() <= 3


def test_separation_of_hand_made_clusters_matches_definition():
    # cluster 1 = {e1 + s e2, e1 - s e2}, cluster 2 = {-e1 + s e2, -e1 - s e2}:
    # mu1 = e1, mu2 = -e1, between = 2; every point is s away from its mean, within = s^2;
    # forgetting.separation = 2 / s
    s = 0.5
    e1, e2 = torch.eye(3)[0], torch.eye(3)[1]
    h1 = torch.stack([e1 + s * e2, e1 - s * e2])
    h2 = torch.stack([-e1 + s * e2, -e1 - s * e2])
    assert math.isclose(forgetting.separation(h1, h2), 2 / s, rel_tol=1e-6)


def test_separation_ignores_common_shift_and_scale():
    g = torch.Generator().manual_seed(0)
    h1, h2 = torch.randn(50, 20, generator=g), torch.randn(70, 20, generator=g) + 1
    assert math.isclose(forgetting.separation(h1, h2), forgetting.separation(3 * h1 + 7, 3 * h2 + 7), rel_tol=1e-5)


def test_every_mode_and_schedule_completes_a_short_run_with_finite_metrics():
    tasks = forgetting.make_forgetting_tasks(0, n_train=16 * 32, n_eval=64)
    cfg = toy_config()
    for schedule in forgetting.FORGET_SCHEDULES:
        for mode in forgetting.FORGET_MODES:
            r = forgetting.train_forgetting(tasks, mode, schedule, cfg)
            for k in ("separation", "loss1", "loss2", "mbe"):
                assert math.isfinite(r[k]), (mode, schedule, k)
            assert (r["forgetting"] is not None) == (schedule == "sequential")
            assert len(r["phase"]) == 32 and r["curve"]["step"] == [0, 8, 16, 24, 32]
            expected = {"baseline": (0.0, 0.0), "iblm": (1.0, 1.0), "gapt": (1e-9, 1 - 1e-9)}[mode]
            assert expected[0] <= r["frac_compression"] <= expected[1], (mode, r["frac_compression"])


def test_modes_differ_only_by_the_mbe_weight():
    # iblm with lambda = 0 must reproduce the baseline bit for bit: same start, data and batches
    tasks = forgetting.make_forgetting_tasks(1, n_train=16 * 32, n_eval=64)
    base = forgetting.train_forgetting(tasks, "baseline", "mixed", toy_config())
    iblm0 = forgetting.train_forgetting(tasks, "iblm", "mixed", toy_config(mbe_weight=0.0))
    assert base["curve"] == iblm0["curve"]


def test_run_forgetting_writes_json_with_every_seed_mode_and_schedule(tmp_path, capsys):
    result = forgetting.run_forgetting(toy_config(seeds=2, out_dir=str(tmp_path)))
    with open(tmp_path / "forgetting.json") as f:
        saved = json.load(f)
    assert len(saved["runs"]) == 2 * len(forgetting.FORGET_MODES) * len(forgetting.FORGET_SCHEDULES)
    gapt_seq = result["summary"]["sequential"]["gapt"]
    assert saved["summary"]["sequential"]["gapt"]["separation"] == list(gapt_seq["separation"])
    assert "paper" in capsys.readouterr().out


def test_the_forgetting_task_runs_from_the_command_line(tmp_path):
    done = run_program([sys.executable, "-m", "experiments.forgetting", "--seeds=1", "--steps=16",
                        "--eval_interval=8", "--n_eval=64", f"--out_dir={tmp_path}"], timeout=300, cwd=HERE)
    assert done.returncode == 0, done.stderr
    assert "separation" in done.stdout and (tmp_path / "forgetting.json").exists()


def author_config(**overrides):
    """The author's regime (config/forgetting_author.py), shrunk: a finite set, micro-batches, lambda 10
    under the soft floor, pretraining then fine-tuning."""
    return toy_config(**{**dict(n_train=64, micro_batches=3, lr=1e-2, mbe_weight=10.0, mbe_softness=0.1,
                                schedules="pretrain_finetune"), **overrides})


def stream_tasks(schedule, cfg, seed=0):
    n = forgetting.stream_length(schedule, cfg.steps, cfg.micro_batches * cfg.batch_size)
    return forgetting.make_forgetting_tasks(seed, n_train=n, n_eval=cfg.n_eval)


def rows_of(x, pool):
    """Index in pool of every row of x (each row must be in pool)."""
    return [int((pool == row).all(1).nonzero()[0]) for row in x]


# --- data: streams, finite sets, micro-batches, schedules -------------------------------------------
def test_the_default_stream_feeds_consecutive_fresh_samples_in_both_schedules():
    tasks = forgetting.make_forgetting_tasks(0, n_train=4 * 32)
    seq = list(forgetting.training_batches(tasks, "sequential", 4, 32))
    mixed = list(forgetting.training_batches(tasks, "mixed", 4, 32))
    assert torch.equal(seq[1][0], tasks["x1_train"][32:64]) and torch.equal(seq[5][0], tasks["x2_train"][32:64])
    assert torch.equal(mixed[1][0], torch.cat([tasks["x1_train"][16:32], tasks["x2_train"][16:32]]))
    # both schedules consume every sample of both streams exactly once
    for batches in (seq, mixed):
        seen = torch.cat([x for x, _ in batches])
        assert len(seen) == 2 * 4 * 32 and len(torch.unique(seen, dim=0)) == len(seen)


def test_a_finite_set_is_drawn_from_again_and_again_with_distinct_samples_in_each_batch():
    tasks = forgetting.make_forgetting_tasks(0, n_train=40)
    batches = forgetting.training_batches(tasks, "sequential", 10, 32, generator=torch.Generator().manual_seed(0))
    seen = []
    for x, y in list(batches)[:10]:  # task 1's steps
        rows = rows_of(x, tasks["x1_train"])
        assert len(set(rows)) == 32  # without replacement inside a batch, as the author's get_batch
        assert torch.equal(y, tasks["y1_train"][rows])  # targets travel with their inputs
        seen += rows
    assert len(seen) == 320 and set(seen) == set(range(40))  # 40 samples, each seen about 8 times


def test_the_same_seed_draws_the_same_batches_and_another_seed_others():
    tasks = forgetting.make_forgetting_tasks(0, n_train=100)
    draw = lambda seed: torch.cat([x for x, _ in forgetting.training_batches(
        tasks, "mixed", 3, 32, micro_batches=2, generator=torch.Generator().manual_seed(seed))])
    assert torch.equal(draw(5), draw(5)) and not torch.equal(draw(5), draw(6))


def test_a_step_of_micro_batches_is_that_many_batches_each_split_between_the_tasks():
    tasks = forgetting.make_forgetting_tasks(0, n_train=3 * 2 * 32)
    x, y = next(forgetting.training_batches(tasks, "mixed", 2, 32, micro_batches=3))
    assert x.shape == (96, 10) and y.shape == (96, 10)
    for k in range(3):  # task 1 (dims 0-4 near 1) fills the first half of each micro-batch, task 2 the second
        first, second = x[32 * k:32 * k + 16], x[32 * k + 16:32 * (k + 1)]
        assert (first[:, :5].mean() > 0.5) and (second[:, 5:].mean() > 0.5)
        assert (first[:, 5:].mean() < 0.5) and (second[:, :5].mean() < 0.5)


def test_pretrain_finetune_mixes_both_tasks_then_trains_task_1_alone():
    assert [forgetting.step_tasks("pretrain_finetune", s, 3) for s in range(6)] == [(1, 2)] * 3 + [(1,)] * 3
    assert [forgetting.step_tasks("sequential", s, 3) for s in range(6)] == [(1,)] * 3 + [(2,)] * 3
    assert {forgetting.step_tasks("mixed", s, 3) for s in range(6)} == {(1, 2)}


@pytest.mark.parametrize("schedule", forgetting.SCHEDULES)
def test_the_stream_is_sized_to_the_schedule_and_a_short_one_is_an_error(schedule):
    n = forgetting.stream_length(schedule, 4, 2 * 32)
    tasks = forgetting.make_forgetting_tasks(0, n_train=n)
    assert len(list(forgetting.training_batches(tasks, schedule, 4, 32, micro_batches=2))) == 8
    short = forgetting.make_forgetting_tasks(0, n_train=n - 16)
    with pytest.raises(ValueError, match="too short"):
        list(forgetting.training_batches(short, schedule, 4, 32, micro_batches=2))


# --- the loss of a step of micro-batches and the soft floor -------------------------------------------
def test_micro_batch_losses_equal_one_forward_pass_per_micro_batch():
    torch.manual_seed(0)
    model, x, y = forgetting.ToyMLP(), torch.randn(3 * 32, 10), torch.randn(3 * 32, 10)
    l1, m = forgetting.micro_batch_losses(model, x, y, 3, 8)
    for k in range(3):
        out, h = model(x[32 * k:32 * (k + 1)])
        assert torch.allclose(l1[k], F.l1_loss(out, y[32 * k:32 * (k + 1)]))
        assert torch.allclose(m[k], patch_mbe(h.unsqueeze(0), 8))


def test_without_softness_the_penalty_is_iblm_loss_and_with_it_a_soft_floor():
    l1, m = torch.tensor(0.3), torch.tensor(0.2, requires_grad=True)
    assert forgetting.penalized_loss(l1, m, 10.0, 0.0) == gapt.iblm_loss(l1, m, 10.0)
    assert forgetting.penalized_loss(l1, m, 0.0, 0.1) == l1  # no weight, no floor: the memorization phase
    # far above the floor the soft floor is lambda * MBE itself ...
    assert math.isclose(forgetting.penalized_loss(l1, m, 10.0, 0.1).item(), 0.3 + 2.0, rel_tol=1e-6)
    # ... and where lambda * MBE reaches the floor, its gradient is halved
    at_floor = torch.tensor(forgetting.MBE_FLOOR / 10, requires_grad=True)
    forgetting.penalized_loss(l1, at_floor, 10.0, 0.1).backward()
    assert math.isclose(at_floor.grad.item(), 10.0 * 0.5, rel_tol=1e-5)


# --- what the gate sees --------------------------------------------------------------------------------
class RecordingGAPT(GAPT):
    """The gate, recording every (L1, MBE) it is fed."""
    seen = []

    def step(self, ce, mbe):
        RecordingGAPT.seen.append((float(ce), float(mbe)))
        return super().step(ce, mbe)


def gate_feed(monkeypatch, **overrides):
    """What the gate of a gapt run sees. With lambda = 0 the phases cannot change the training, so runs
    that differ only in gate_signal train identically and their feeds can be compared."""
    monkeypatch.setattr(forgetting, "GAPT", RecordingGAPT)
    RecordingGAPT.seen = []
    cfg = toy_config(mbe_weight=0.0, **overrides)
    forgetting.train_forgetting(stream_tasks("mixed", cfg), "gapt", "mixed", cfg)
    return torch.tensor(RecordingGAPT.seen, dtype=torch.float64)


def test_the_batch_gate_sees_every_micro_batch_and_the_step_mean_gate_their_mean(monkeypatch):
    per_batch = gate_feed(monkeypatch, micro_batches=4, gate_signal="batch")
    per_step = gate_feed(monkeypatch, micro_batches=4, gate_signal="step_mean")
    assert per_batch.shape == (2 * 16 * 4, 2) and per_step.shape == (2 * 16, 2)
    assert torch.allclose(per_batch.view(-1, 4, 2).mean(1), per_step, rtol=1e-5)


def test_the_ema_gate_sees_a_moving_average_of_the_step_means(monkeypatch):
    raw = gate_feed(monkeypatch, micro_batches=2, gate_signal="step_mean")
    ema = gate_feed(monkeypatch, micro_batches=2, gate_signal="ema", gate_ema=0.8)
    assert torch.allclose(ema[0], raw[0])
    for t in range(1, len(raw)):
        assert torch.allclose(ema[t], 0.8 * ema[t - 1] + 0.2 * raw[t], rtol=1e-5)


def test_an_ema_fed_gate_keeps_compressing_through_batch_noise_that_ends_a_batch_fed_phase():
    # a plateaued loss whose batches alternate +-20%: the raw L1 rises 50% above the phase's best at the
    # next batch, which the tau rule (10%) reads as forgetting; the EMA of it moves by ~2% only
    cfg = toy_config(gate_signal="ema", gate_ema=0.9)
    noisy = [(1.0 + (0.2 if t % 2 else -0.2), 0.5) for t in range(400)]
    compressing = {}
    for signal in ("batch", "ema"):
        gate, smoothed, phases = GAPT(patience_mem=50, patience_comp=1000), None, []
        for l1, m in noisy:
            step_mean = torch.tensor([l1, m], dtype=torch.float64)
            smoothed = forgetting.gate_input(step_mean, smoothed, cfg) if signal == "ema" else step_mean
            phases.append(int(gate.step(*smoothed)))
        compressing[signal] = phases.count(2)
    assert compressing["batch"] < 0.05 * len(noisy) and compressing["ema"] > 0.75 * len(noisy)


def test_pretrain_finetune_restarts_the_gate_for_fine_tuning():
    # a gate that never leaves compression once in it (no tau spike, endless patience): it compresses at
    # the switch in one run, and starts fine-tuning in memorization when fine-tuning is a new run
    cfg = forgetting.load_config(["--steps=16", "--eval_interval=8", "--n_eval=64", "--patience_mem=1",
                                  "--patience_comp=10000", "--tau=1e9", "--delta_ce=1e9"])
    runs = {s: forgetting.train_forgetting(stream_tasks(s, cfg), "gapt", s, cfg) for s in ("mixed", "pretrain_finetune")}
    assert runs["mixed"]["phase"][16] == 2 and runs["pretrain_finetune"]["phase"][16] == 1
    assert runs["pretrain_finetune"]["phase"][15] == 2 and runs["pretrain_finetune"]["phase"][18] == 2


# --- the two separations and the runs ---------------------------------------------------------------
def test_the_training_separation_is_one_seeded_draw_and_the_whole_set_when_the_draw_is():
    tasks = forgetting.make_forgetting_tasks(0, n_train=48, n_eval=64)
    torch.manual_seed(0)
    model = forgetting.ToyMLP()
    draw = lambda n, seed: forgetting.training_separation(model, tasks, n, seed)
    assert draw(32, 1) == draw(32, 1) and draw(32, 1) != draw(32, 2)
    with torch.no_grad():
        whole = forgetting.separation(model(tasks["x1_train"])[1], model(tasks["x2_train"])[1])
    assert math.isclose(draw(48, 1), whole, rel_tol=1e-5)


def test_every_mode_completes_the_authors_regime_with_finite_metrics():
    cfg = author_config()
    tasks = forgetting.make_forgetting_tasks(0, n_train=cfg.n_train, n_eval=cfg.n_eval)
    for mode in forgetting.FORGET_MODES:
        r = forgetting.train_forgetting(tasks, mode, "pretrain_finetune", cfg, seed=0)
        for k in ("separation", "separation_train", "loss1", "loss2", "mbe"):
            assert math.isfinite(r[k]), (mode, k)
        assert len(r["phase"]) == 32 and r["forgetting"] is None
        expected = {"baseline": (0.0, 0.0), "iblm": (1.0, 1.0), "gapt": (1e-9, 1 - 1e-9)}[mode]
        assert expected[0] <= r["frac_compression"] <= expected[1], (mode, r["frac_compression"])


def test_run_forgetting_reports_both_separations_against_the_baseline(tmp_path, capsys):
    cfg = author_config(seeds=2, schedules="mixed,pretrain_finetune", out_dir=str(tmp_path))
    result = forgetting.run_forgetting(cfg)
    with open(tmp_path / "forgetting.json") as f:
        saved = json.load(f)
    assert list(saved["summary"]) == ["mixed", "pretrain_finetune"] and len(saved["runs"]) == 2 * 2 * 3
    gapt_runs = [r for r in saved["runs"] if r["schedule"] == "mixed" and r["mode"] == "gapt"]
    base = {r["seed"]: r["separation_train"] for r in saved["runs"] if r["schedule"] == "mixed" and r["mode"] == "baseline"}
    paired = [100 * (r["separation_train"] / base[r["seed"]] - 1) for r in gapt_runs]
    s = result["summary"]["mixed"]["gapt"]
    assert math.isclose(s["sep_train_change_pct_paired"][0], sum(paired) / 2, rel_tol=1e-9)
    assert "sep_change_pct" in s and "sep train" in capsys.readouterr().out


def test_the_authors_regime_runs_from_its_config_file(tmp_path):
    done = run_program([sys.executable, "-m", "experiments.forgetting", "config/forgetting_author.py",
                        "--seeds=1", "--steps=4", "--micro_batches=2", "--eval_interval=4", "--n_eval=64",
                        f"--out_dir={tmp_path}"], timeout=300, cwd=HERE)
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "forgetting.json").read_text())["config"]
    assert (config["n_train"], config["lr"], config["mbe_weight"], config["schedules"]) == (500, 1e-2, 10.0, "pretrain_finetune")


def test_every_forgetting_key_has_a_rule():
    assert set(forgetting.RULES) == set(forgetting.DEFAULTS)


@pytest.mark.parametrize("arg, message", [
    ("--lr=0", "lr must be positive, got 0.0"), ("--lr=-1e-3", "lr must be positive"),
    ("--mbe_weight=-1", "mbe_weight must be >= 0"), ("--tau=-0.1", "tau must be >= 0"),
    ("--delta_ce=-0.01", "delta_ce must be >= 0"), ("--delta_mbe=-0.01", "delta_mbe must be >= 0"),
    ("--patience_mem=-1", "patience_mem must be >= 0"), ("--patience_comp=-1", "patience_comp must be >= 0"),
    ("--patch_size=0", "patch_size must be positive"), ("--batch_size=-32", "batch_size must be positive"),
    ("--n_eval=0", "n_eval must be positive"), ("--eval_interval=0", "eval_interval must be positive"),
    ("--seeds=-1", "seeds must be positive"), ("--seeds=0", "seeds must be positive"),
    ("--steps=0", "steps must be positive"), ("--out_dir=", "out_dir must be a non-empty path"),
    ("--schedules=", "schedules must be distinct names from sequential,mixed,pretrain_finetune"),
    ("--n_train=-1", "n_train must be 0"), ("--n_train=16", "n_train must be 0"),
    ("--micro_batches=0", "micro_batches must be positive"), ("--n_sep_train=0", "n_sep_train must be positive"),
    ("--schedules=interleaved", "schedules must be"), ("--schedules=mixed,mixed", "schedules must be"),
    ("--gate_signal=smooth", "gate_signal must be one of"), ("--gate_ema=1", "gate_ema must be in"),
    ("--mbe_softness=-0.1", "mbe_softness must be")])
def test_a_forgetting_value_its_key_cannot_take_stops_naming_the_key_and_what_it_must_be(arg, message):
    with pytest.raises(SystemExit, match=message):
        forgetting.load_config([arg])


def test_a_held_out_set_that_is_not_whole_patches_stops_before_training():
    with pytest.raises(SystemExit, match=r"n_eval \(100\) must be a multiple of patch_size \(8\)"):
        forgetting.load_config(["--n_eval=100"])


@pytest.mark.parametrize("out_dir", ["a_file", "a_file/out"])
def test_forgetting_stops_before_training_when_out_dir_is_a_file_or_under_one(tmp_path, out_dir):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit, match=r"out_dir .* is not a writable folder\); choose another --out_dir"):
        forgetting.load_config([f"--out_dir={tmp_path / out_dir}"])


def test_forgetting_with_a_negative_learning_rate_exits_non_zero_with_one_line_and_writes_nothing(tmp_path):
    done = run_program([sys.executable, "-m", "experiments.forgetting", "--lr=-1", f"--out_dir={tmp_path / 'out'}"],
                       timeout=300, cwd=HERE)
    assert done.returncode != 0 and done.stderr.strip() == "forgetting.py: lr must be positive, got -1.0"
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# The benchmark (experiments/bench.py)
# -----------------------------------------------------------------------------
def test_the_benchmark_times_every_variant_against_the_baseline(tmp_path):
    summary = bench.run_bench(bench.load_config(tiny_args(tmp_path, steps=2, rounds=2, align_interval=2, vocab_size=32)))
    names = [row["variant"] for row in summary["rows"]]
    assert names == ["baseline (CE only)", "gapt, compression phase", "alignment measurement (one)",
                     "baseline + alignment every 2"]
    assert summary["rows"][0]["ratio_to_baseline"] == 1.0
    baseline, _, one_alignment, amortized = (row["ms_per_step"] for row in summary["rows"])
    assert amortized == pytest.approx(baseline + one_alignment / 2, abs=0.02)
    assert all(row["ms_per_step"] > 0 for row in summary["rows"]) and "tok_per_s" not in summary["rows"][2]
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert saved["rows"] == summary["rows"]


@pytest.mark.parametrize("arg, message", [
    ("--steps=-1", "steps must be positive"), ("--steps=0", "steps must be positive"),
    ("--rounds=-2", "rounds must be positive"), ("--rounds=0", "rounds must be positive"),
    ("--vocab_size=70000", r"vocab_size must be in 1..65536 \(the random tokens are uint16\)"),
    ("--mbe_weight=-1", "mbe_weight must be >= 0")])
def test_a_benchmark_value_its_key_cannot_take_stops_naming_the_key(arg, message):
    with pytest.raises(SystemExit, match=message):
        bench.load_config([arg])


@pytest.mark.parametrize("out_dir", ["a_file", "a_file/out"])
def test_the_benchmark_stops_before_timing_when_out_dir_is_a_file_or_under_one(tmp_path, out_dir):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit, match=r"out_dir .* is not a writable folder\); choose another --out_dir"):
        bench.load_config([f"--out_dir={tmp_path / out_dir}"])


def test_the_benchmark_stops_before_writing_when_micro_batches_do_not_split_over_processes(tmp_path, monkeypatch):
    # torchrun with 2 processes, without launching them: only the world size matters to the check
    monkeypatch.setattr(gapt, "setup_distributed", lambda cfg: gapt.Dist(0, 0, 2, torch.device("cpu")))
    cfg = bench.load_config(tiny_args(tmp_path, gradient_accumulation_steps=3, vocab_size=32))
    with pytest.raises(SystemExit, match=r"gradient_accumulation_steps \(3\) must be a multiple of the number of "
                                         r"processes \(2\)"):
        bench.run_bench(cfg)
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# Figures and tables (experiments/report.py)
# -----------------------------------------------------------------------------
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="figures need matplotlib (pip install matplotlib)")


def test_compression_phases_are_read_from_the_phase_change_rows():
    rows = [dict(iter=3, event="phase_change", phase=2), dict(iter=5, event="phase_change", phase=1),
            dict(iter=9, ce=1.0), dict(iter=12, event="phase_change", phase=2)]
    assert report.compression_spans(rows, last_iter=20) == [(3, 5), (12, 20)]


def test_the_mean_curve_averages_runs_at_the_iterations_all_of_them_logged():
    curves = [[(0, 1.0), (5, 2.0), (10, 3.0)], [(0, 3.0), (10, 5.0)], [(0, 2.0), (5, 9.0), (10, 4.0)]]
    assert report.mean_curve(curves) == ([0, 10], [2.0, 4.0])


def test_plot_draws_the_logged_runs_into_a_png(tmp_path, data):
    pytest.importorskip("matplotlib")
    gapt.train(tiny_config(tmp_path, mode="gapt", patience_mem=1, delta_ce=0.5, align_interval=2))
    for seed in (1, 2):  # a mode with several seeds is drawn with its mean
        write_run_log(tmp_path / f"baseline-{seed}", "baseline", seed)
    plot_file = tmp_path / "figure.png"
    runs = ",".join(str(tmp_path / d) for d in ("out", "baseline-1", "baseline-2"))
    report.run_report(gapt.parse_config([f"--runs={runs}", f"--file={plot_file}"], report.DEFAULTS))
    assert plot_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_figure_draws_a_line_per_setting_and_never_averages_two_lambdas(tmp_path):
    runs = [("gapt", 1, 1.0), ("gapt", 2, 1.0), ("gapt", 1, 0.03), ("baseline", 1, 1.0)]
    for mode, seed, weight in runs:
        write_run_log(tmp_path / f"{mode}-{weight}-{seed}", mode, seed, mbe_weight=weight)
    groups = report.line_groups([report.read_run(tmp_path / f"{m}-{w}-{s}") for m, s, w in runs])
    assert [(label, mode, style, len(members)) for label, mode, style, members in groups] == [
        ("gapt lambda 1.0", "gapt", "-", 2), ("gapt lambda 0.03", "gapt", "--", 1), ("baseline", "baseline", "-", 1)]


def test_plot_without_runs_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--runs"):
        report.run_report(gapt.parse_config([f"--file={tmp_path / 'x.png'}"], report.DEFAULTS))


def write_run_log(out_dir, mode, seed, val_ood_answer_ce=1.0, val_mbe_blocks=None, **settings):
    """A log.jsonl with two evaluations; settings go into its config (keys it lacks read as defaults)."""
    os.makedirs(out_dir)
    final = dict(iter=10, event="eval", val_ce=2.0, val_ood_answer_ce=val_ood_answer_ce)
    if val_mbe_blocks is not None:
        final["val_mbe_blocks"] = val_mbe_blocks
    rows = [dict(event="start", iter=0, config=dict(mode=mode, seed=seed, **settings)),
            dict(iter=5, event="eval", val_ce=9.0, val_ood_answer_ce=99.0),  # not the final one: ignored
            final]
    with open(os.path.join(out_dir, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_the_summary_table_reports_the_final_evaluation_per_mode_and_the_change_vs_baseline(tmp_path):
    runs = (("b1", "baseline", 1, 2.0), ("b2", "baseline", 2, 4.0), ("g1", "gapt", 1, 2.4), ("i3", "iblm", 3, 1.0))
    for name, mode, seed, ood in runs:
        write_run_log(tmp_path / name, mode, seed, ood)
    table = report.summarize_runs([str(tmp_path / name) for name, *_ in runs])
    assert "at iter 10," in table
    assert "| baseline | 2 | 2.0000 ± 0.0000 | 2.0000 ± 0.0000 | 3.0000 ± 1.4142 |" in table
    # against the baseline of its own seed (2.0), not the mean over seeds 1 and 2 (3.0, which would say -20%)
    assert "| gapt | 1 | 2.0000 (+0.0%) | 2.0000 (+0.0%) | 2.4000 (+20.0%) |" in table
    assert "| iblm | 1 | 2.0000 | 2.0000 | 1.0000 |" in table  # no baseline of seed 3: no change to give


def test_the_lowest_validation_ce_and_early_stopping_on_test_ood_are_reported_beside_the_final_step():
    rows = [dict(event="start", iter=0, config=dict(mode="gapt", seed=1)),
            dict(iter=5, event="eval", val_ce=3.0, test_ood_answer_ce=4.0, val_ood_answer_ce=5.0),
            dict(iter=10, event="eval", val_ce=2.5, test_ood_answer_ce=3.0, val_ood_answer_ce=6.0),
            dict(iter=15, event="eval", val_ce=2.8, test_ood_answer_ce=3.5, val_ood_answer_ce=4.5)]
    metrics = report.final_metrics("no-such-dir", rows)
    assert metrics["iter"] == 15 and metrics["val_ce"] == 2.8 and metrics["val_ood_answer_ce"] == 4.5
    assert metrics["min_val_ce"] == 2.5
    # stopping at iter 10, where test_ood is lowest: the leaked 3.0, and val_ood there, 6.0
    assert metrics["min_test_ood_answer_ce"] == 3.0 and metrics["val_ood_answer_ce_at_min_test_ood"] == 6.0
    del rows[1]["test_ood_answer_ce"]  # a run that did not score test_ood at every evaluation: nothing chosen
    assert "min_test_ood_answer_ce" not in report.final_metrics("no-such-dir", rows)


def test_the_summary_gives_a_row_per_lambda_when_a_mode_ran_at_several(tmp_path):
    for name, mode, weight, ood in (("b", "baseline", 1.0, 2.0), ("g1", "gapt", 1.0, 3.0), ("g2", "gapt", 0.1, 1.0),
                                    ("g3", "gapt", 0.1, 1.5), ("i", "iblm", 1.0, 4.0)):
        write_run_log(tmp_path / name, mode, 1, ood, mbe_weight=weight)
    table = report.summarize_runs([str(tmp_path / n) for n in ("b", "g1", "g2", "g3", "i")])
    assert "| gapt lambda 1.0 | 1 |" in table and "| 3.0000 (+50.0%) |" in table
    assert "| gapt lambda 0.1 | 2 |" in table and "| 1.2500 ± 0.3536 (-37.5%) |" in table
    assert "| baseline | 1 |" in table and "| iblm | 1 |" in table  # one lambda each: the mode alone


def test_the_summary_never_averages_runs_of_different_protocols_together(tmp_path):
    """The confound runs: a half-batch baseline and a gate reading test_ood get rows of their own,
    and changes are against the first baseline row's runs of the same seeds; seed and out_dir never
    split a row."""
    runs = (("b1", "baseline", 1, {}, 2.0), ("b2", "baseline", 2, {}, 4.0), ("h1", "baseline", 1, dict(batch_size=8), 1.0),
            ("g1", "gapt", 1, {}, 6.0), ("l1", "gapt", 1, dict(gate_reads="test_ood"), 1.5))
    for name, mode, seed, settings, ood in runs:
        write_run_log(tmp_path / name, mode, seed, ood, **settings)
    table = report.summarize_runs([str(tmp_path / name) for name, *_ in runs])
    default_batch = gapt.DEFAULTS["batch_size"]
    assert f"| baseline batch_size {default_batch} | 2 |" in table and "| baseline batch_size 8 | 1 |" in table
    assert "| gapt gate_reads train | 1 |" in table and "| gapt gate_reads test_ood | 1 |" in table
    assert "| 6.0000 (+200.0%) |" in table  # gapt against the full-batch baseline of its seed, 2.0
    assert "| 1.0000 (-50.0%) |" in table


def test_the_summary_gives_the_all_block_mbe_beside_the_regularized_one_also_for_older_logs(tmp_path):
    write_run_log(tmp_path / "b1", "baseline", 1, val_mbe_blocks=[1.0, 0.5, 0.25, 0.25])  # logged no val_mbe_all
    write_run_log(tmp_path / "g1", "gapt", 1, val_mbe_blocks=[0.5, 0.25, 0.125, 0.125])
    table = report.summarize_runs([str(tmp_path / "b1"), str(tmp_path / "g1")]).splitlines()
    assert "| mode | runs | val_ce | min_val_ce | val_mbe_all | val_ood_answer_ce |" in table[2]
    assert "| 0.5000 |" in table[4] and "| 0.2500 (-50.0%) |" in table[5]  # the mean of 4 blocks


def test_the_summary_has_a_table_per_block_for_each_spectrum_measure_logged(tmp_path):
    for name, mode, share in (("b1", "baseline", 0.5), ("g1", "gapt", 0.75)):
        write_run_log(tmp_path / name, mode, 1, val_mbe_blocks=[1.0, 0.5])
        rows = log_rows(tmp_path / name)
        rows[-1].update(val_top_share_blocks=[share, share], val_mbe_centred_blocks=[1.5, 1.5])
        with open(tmp_path / name / "log.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    table = report.summarize_runs([str(tmp_path / "b1"), str(tmp_path / "g1")])
    assert "the largest eigenvalue's share" in table and "mean token removed" in table
    assert "| gapt | 1 | 0.7500 (+50.0%) | 0.7500 (+50.0%) |" in table
    assert "alpha-1" not in table  # not logged: no table


def test_the_summary_reports_the_alignment_cosine_per_window_and_its_sign_changes(tmp_path):
    for name, cosines in (("b1", [0.2, -0.1, -0.3, -0.5]), ("b2", [0.4, 0.1, -0.1, 0.3])):
        write_run_log(tmp_path / name, "baseline", 1)
        rows = log_rows(tmp_path / name)
        rows[0]["config"]["eval_interval"] = 10
        rows += [dict(iter=5 * i, align_cos=c) for i, c in enumerate(cosines)]
        with open(tmp_path / name / "log.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    table = report.summarize_runs([str(tmp_path / "b1"), str(tmp_path / "b2")])
    assert "| mode | runs | sign changes per run | 0-9 | 10-19 |" in table
    # steps 0-9: 0.2, -0.1, 0.4, 0.1 (mean 0.15, s.e. 0.104, 3 > 0); 10-19: -0.3, -0.5, -0.1, 0.3
    # sign changes: b1 1, b2 2
    assert "| baseline | 2 | 1.5 | +0.15 ± 0.10 (3/4) | -0.15 ± 0.17 (1/4) |" in table
    # one column for steps 0-19 when asked for windows of 20 steps (before and after memorization, say)
    table = report.summarize_runs([str(tmp_path / "b1"), str(tmp_path / "b2")], align_window=20)
    assert "| mode | runs | sign changes per run | 0-19 |" in table and "20-39" not in table
    assert re.search(r"\| baseline \| 2 \| 1\.5 \| [+-]0\.00 ± 0\.11 \(4/8\) \|", table)  # the 8 cosines sum to 0


def test_the_summary_leaves_out_runs_not_yet_evaluated_and_names_them(tmp_path):
    write_run_log(tmp_path / "b1", "baseline", 1)
    os.makedirs(tmp_path / "g1")
    with open(tmp_path / "g1" / "log.jsonl", "w") as f:
        f.write(json.dumps(dict(event="start", iter=0, config=dict(mode="gapt", seed=1))) + "\n")
    table = report.summarize_runs([str(tmp_path / "b1"), str(tmp_path / "g1")])
    assert "| baseline | 1 |" in table and "| gapt |" not in table
    assert f"no evaluation yet: {tmp_path / 'g1'}" in table
    assert "no table" in report.summarize_runs([str(tmp_path / "g1")])


def test_the_summary_reports_the_share_of_steps_spent_compressing(tmp_path):
    write_run_log(tmp_path / "b1", "baseline", 1)
    write_run_log(tmp_path / "i1", "iblm", 1)
    write_run_log(tmp_path / "g1", "gapt", 1)
    with open(tmp_path / "g1" / "log.jsonl", "a") as f:  # compressing over steps 2-3 and 7-9 of 10
        f.writelines(json.dumps(dict(iter=it, event="phase_change", phase=p)) + "\n" for it, p in ((2, 2), (4, 1), (7, 2)))
    table = report.summarize_runs([str(tmp_path / n) for n in ("b1", "i1", "g1")])
    assert "| compressing | compression_phases |" in table
    assert "| 0.0000 | 0.0000 |" in table.split("| baseline |")[1].split("\n")[0]
    assert "| 1.0000 | 1.0000 |" in table.split("| iblm |")[1].split("\n")[0]
    assert "| 0.5000 | 2.0000 |" in table.split("| gapt |")[1].split("\n")[0]


def test_the_summary_reports_the_validation_mbe_of_every_block(tmp_path):
    write_run_log(tmp_path / "b1", "baseline", 1, val_mbe_blocks=[1.0, 2.0, 1.0])
    write_run_log(tmp_path / "b2", "baseline", 2, val_mbe_blocks=[1.0, 1.0, 1.0])
    write_run_log(tmp_path / "g1", "gapt", 1, val_mbe_blocks=[1.0, 0.3, 1.0])
    table = report.summarize_runs([str(tmp_path / n) for n in ("b1", "b2", "g1")])
    assert "| mode | runs | block 0 | block 1 | block 2 |" in table
    assert "| baseline | 2 | 1.0000 ± 0.0000 | 1.5000 ± 0.7071 | 1.0000 ± 0.0000 |" in table
    assert "| gapt | 1 | 1.0000 (+0.0%) | 0.3000 (-85.0%) | 1.0000 (+0.0%) |" in table  # against seed 1's 2.0


def append_rows(out_dir, *rows):
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def write_exact_match(out_dir, val):
    """eval_arithmetic.json as sample.py --eval=arithmetic writes it (the rows report.py reads)."""
    rows = [dict(split="val", exact_match=val), dict(split="val_ood", exact_match=val / 2)]
    with open(os.path.join(out_dir, "eval_arithmetic.json"), "w") as f:
        json.dump(dict(rows=rows), f)


RESUMED_AS_GAPT = "".join(json.dumps(r) + "\n" for r in (
    dict(event="start", iter=0, config=dict(mode="baseline", seed=1)), dict(iter=5, event="eval", val_ce=3.0),
    dict(event="start", iter=5, config=dict(mode="gapt", seed=1)), dict(iter=10, event="eval", val_ce=2.0)))
ONLY_STARTED = json.dumps(dict(event="start", iter=0, config=dict(mode="baseline", seed=1))) + "\n"
GARBAGE = "not json \x00\n[1]\n7\n"  # a line that is no JSON, and JSON that is no row


def make_run(folder, log=None, files=()):
    """A run's folder: write_run_log's baseline of seed 1, or a log.jsonl of the text `log`; and (name, text) files."""
    if log is None:
        write_run_log(folder, "baseline", 1)
    else:
        os.makedirs(folder)
        (folder / "log.jsonl").write_text(log)
    for name, text in files:
        (folder / name).write_text(text)
    return str(folder)


def make_file(path):
    path.write_text("notes")
    return str(path)


def runs_arg(*folders):
    return "--runs=" + ",".join(map(str, folders))


def t_quantile(df, p=0.975):
    """Student t's quantile from its density integrated numerically: independent of report's table."""
    x = np.linspace(0, 20, 2_000_001)
    density = np.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
                     - (df + 1) / 2 * np.log1p(x * x / df))
    area = np.concatenate([[0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(x))])
    return float(np.interp(p - 0.5, area, x))


def paired_row(table, label, metric):
    """The cells of the paired-change row of `label` and `metric`."""
    rows = [line.strip("| ").split(" | ") for line in table.splitlines() if line.startswith(f"| {label} | ")]
    return next(cells[1:] for cells in rows if len(cells) > 3 and cells[3] == metric)


def numbers(cell):
    return [float(n) for n in re.findall(r"[+-]\d+\.\d+", cell)]


# ---- paired changes over seeds ----

@pytest.mark.parametrize("df", [*range(1, 31), 31, 40, 100, 1000])
def test_the_t_quantile_is_student_t_at_97_5_percent_for_every_degree_of_freedom(df):
    assert report.t_975(df) == pytest.approx(t_quantile(df), abs=1e-4)


def test_runs_are_paired_by_seed_with_the_mean_change_and_its_t_interval_over_seeds(tmp_path):
    baseline = {1: 2.0, 2: 3.0, 3: 2.5, 5: 9.0}
    gapt_runs = {3: 2.0, 1: 1.8, 2: 2.9, 4: 1.0}  # listed out of seed order; seeds 4 and 5 have no partner
    for seed, ood in baseline.items():
        write_run_log(tmp_path / f"b{seed}", "baseline", seed, ood)
    for seed, ood in gapt_runs.items():
        write_run_log(tmp_path / f"g{seed}", "gapt", seed, ood)
    table = report.summarize_runs([str(tmp_path / f"{name}{seed}") for name, runs in (("b", baseline), ("g", gapt_runs))
                                   for seed in runs])
    seeds = [1, 2, 3]
    changes = [gapt_runs[s] - baseline[s] for s in seeds]
    relative = [100 * (gapt_runs[s] - baseline[s]) / baseline[s] for s in seeds]
    n_seeds, informative, _, per_seed, change, change_pct = paired_row(table, "gapt", "val_ood_answer_ce")[:6]
    assert (n_seeds, informative) == ("3", "n/a")  # no eval_arithmetic.json: nothing says the task was learned
    assert per_seed == ", ".join(f"{s}: {c:+.4f}" for s, c in zip(seeds, changes))
    for cell, values, rounding in ((change, changes, 1e-4), (change_pct, relative, 0.06)):  # printed: 4 decimals, 0.1%
        half = t_quantile(len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values))
        mean = np.mean(values)
        assert numbers(cell) == pytest.approx([mean, mean - half, mean + half], abs=rounding)
    assert paired_row(table, "gapt", "val_ce")[4].startswith("+0.0000 [+0.0000, +0.0000]")  # every run at 2.0
    assert f"{tmp_path / 'g4'} (seed 4: 0 baseline and 1 gapt runs)" in table
    assert f"{tmp_path / 'b5'} (seed 5: 1 baseline and 0 gapt runs)" in table


def test_one_pair_gives_its_change_and_says_there_is_no_interval(tmp_path):
    write_run_log(tmp_path / "b1", "baseline", 1, 2.0)
    write_run_log(tmp_path / "g1", "gapt", 1, 1.5)
    n_seeds, _, _, per_seed, change, change_pct = paired_row(
        report.summarize_runs([str(tmp_path / "b1"), str(tmp_path / "g1")]), "gapt", "val_ood_answer_ce")[:6]
    assert (n_seeds, per_seed) == ("1", "1: -0.5000")
    assert change == "-0.5000 (1 seed: no interval)" and change_pct == "-25.0% (1 seed: no interval)"


def test_a_seed_with_several_runs_in_a_row_is_named_and_left_out_of_the_pairs(tmp_path):
    for name, mode, seed in (("b1", "baseline", 1), ("b2", "baseline", 2), ("g1", "gapt", 1), ("g2", "gapt", 2),
                             ("g2-again", "gapt", 2)):
        write_run_log(tmp_path / name, mode, seed)
    table = report.summarize_runs([str(tmp_path / n) for n in ("b1", "b2", "g1", "g2", "g2-again")])
    assert paired_row(table, "gapt", "val_ce")[0] == "1"  # seed 1 only
    for name in ("b2", "g2", "g2-again"):
        assert f"{tmp_path / name} (seed 2: 1 baseline and 2 gapt runs)" in table


def test_a_comparison_is_informative_when_both_runs_of_every_pair_learned_the_task(tmp_path):
    exact_match = dict(b1=0.5, b2=0.6, g1=0.4, g2=0.2, i1=0.5)  # g2 learned less than the default 0.3
    for name, val in exact_match.items():
        write_run_log(tmp_path / name, dict(b="baseline", g="gapt", i="iblm")[name[0]], int(name[1]))
        write_exact_match(tmp_path / name, val)
    write_run_log(tmp_path / "h1", "baseline", 1, batch_size=8)  # a row without eval_arithmetic.json
    run_dirs = [str(tmp_path / name) for name in (*exact_match, "h1")]
    table = report.summarize_runs(run_dirs)
    assert paired_row(table, "gapt", "val_exact_match")[:2] == ["2", "no (1/2 pairs)"]
    assert paired_row(table, "iblm", "val_exact_match")[:2] == ["1", "yes"]
    threshold = min(exact_match.values())
    table = report.summarize_runs(run_dirs, learned_exact_match=threshold)
    assert paired_row(table, "gapt", "val_exact_match")[1] == "yes"
    assert f">= {threshold}" in table
    # the half-batch baseline is a row of its own, compared with the full-batch one; it has no exact match
    assert paired_row(table, "baseline batch_size 8", "val_ce")[1] == "n/a"


def test_a_relative_change_against_a_reference_run_at_zero_is_n_a(tmp_path):
    for name, mode, val in (("b1", "baseline", 0.0), ("g1", "gapt", 0.4)):
        write_run_log(tmp_path / name, mode, 1)
        write_exact_match(tmp_path / name, val)
    cells = paired_row(report.summarize_runs([str(tmp_path / "b1"), str(tmp_path / "g1")]), "gapt", "val_exact_match")
    assert cells[4].startswith("+0.4000") and cells[5] == "n/a"


@needs_matplotlib
def test_the_threshold_of_a_learned_task_and_the_alignment_window_are_checked():
    for arg, message in (("--learned_exact_match=1.5", "learned_exact_match must be in [0, 1], got 1.5"),
                         ("--align_window=-10", "align_window must be >= 0")):
        with pytest.raises(SystemExit, match=re.escape(message)):
            gapt.parse_config(["--runs=out", arg], report.DEFAULTS, report.RULES)


def test_the_digit_level_scores_of_sample_py_are_paired_and_the_length_bias_is_correlated_within_seed(tmp_path):
    """What the OOD answer CE mixes, apart: the end token, the leading and the last digit, the length bias;
    each paired by seed from eval_arithmetic.json, and the length bias's link to the answer CE measured on
    the pairs' differences, where no seed effect is left."""
    bias = {("b", 1): -1.0, ("g", 1): -3.0, ("b", 2): -0.5, ("g", 2): -0.5, ("b", 3): -2.0, ("g", 3): -1.0}
    ood = {("b", 1): 3.0, ("g", 1): 4.0, ("b", 2): 2.0, ("g", 2): 2.1, ("b", 3): 3.5, ("g", 3): 3.0}
    for (arm, seed), length_bias in bias.items():
        out_dir = tmp_path / f"{arm}{seed}"
        write_run_log(out_dir, dict(b="baseline", g="gapt")[arm], seed, ood[arm, seed])
        ood_row = dict(split="val_ood", exact_match=0.0, end_ce=seed / 10, length_bias=length_bias,
                       answer_ce_from_first=[seed / 4, 9.0], answer_ce_from_last=[seed / 2, 9.0],
                       leading_digit_accuracy=0.5, last_digit_accuracy=0.1 * seed * (arm == "g"))
        with open(out_dir / "eval_arithmetic.json", "w") as f:
            json.dump(dict(rows=[dict(split="val", exact_match=0.5), ood_row]), f)
    table = report.summarize_runs([str(tmp_path / f"{arm}{seed}") for arm, seed in bias])
    assert paired_row(table, "gapt", "val_ood_length_bias")[3] == "1: -2.0000, 2: +0.0000, 3: +1.0000"
    assert paired_row(table, "gapt", "val_ood_last_digit_accuracy")[3] == "1: +0.1000, 2: +0.2000, 3: +0.3000"
    for key in ("val_ood_end_ce", "val_ood_leading_digit_ce", "val_ood_last_digit_ce"):  # the same in both arms
        assert paired_row(table, "gapt", key)[3] == "1: +0.0000, 2: +0.0000, 3: +0.0000"
    r = np.corrcoef([-2.0, 0.0, 1.0], [1.0, 0.1, -0.5])[0, 1]
    assert f"over 3 seeds of the change in val_ood_length_bias with the change in val_ood_answer_ce: r = {r:+.2f}" in table


def test_the_whole_split_scores_of_sample_py_are_paired_beside_the_logged_ones(tmp_path):
    """The logged val CE reads a few batches, other ones for every seed; sample.py --eval=val reads the
    whole split, and the report pairs its CE and MBE as it pairs the logged ones."""
    runs = []
    for mode, seed, ce, mbe in (("baseline", 1, 3.0, 1.0), ("gapt", 1, 3.3, 0.5), ("baseline", 2, 2.0, 1.0),
                                ("gapt", 2, 2.1, 0.8)):
        runs.append(write_text_log(tmp_path / f"{mode}{seed}", mode, seed, [5.0, 4.0]))
        (tmp_path / f"{mode}{seed}" / "eval_val.json").write_text(json.dumps(dict(ce=ce, mbe_all=mbe, tokens=99)))
    table = report.summarize_runs(runs)
    assert paired_row(table, "gapt", "whole_val_ce")[3] == "1: +0.3000, 2: +0.1000"
    assert numbers(paired_row(table, "gapt", "whole_val_mbe_all")[5])[0] == pytest.approx(-35.0)  # -50% and -20%
    assert paired_row(table, "gapt", "val_ce")[3] == "1: +0.0000, 2: +0.0000"  # the log's, still there
    (tmp_path / "gapt2" / "eval_val.json").write_text("{}")
    with pytest.raises(SystemExit, match="has no ce, mbe_all; rerun python sample.py --eval=val"):
        report.summarize_runs(runs)


def write_text_log(out_dir, mode, seed, val_ces, compress_at=()):
    """A text run's log: evaluations at steps 0, 10, 20, ... with these validation CEs (train CE 1 below
    each), and a compression phase starting at each step of compress_at (gapt)."""
    os.makedirs(out_dir)
    rows = [dict(event="start", iter=0, config=dict(mode=mode, seed=seed))]
    rows += [dict(iter=it, event="phase_change", phase=2) for it in compress_at]
    rows += [dict(iter=10 * i, event="eval", val_ce=v, train_ce=v - 1.0) for i, v in enumerate(val_ces)]
    (out_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(out_dir)


def test_text_runs_report_where_validation_ce_was_lowest_and_whether_compression_came_before_it(tmp_path):
    """The paper's text regime: the claim is about the best model of a run that memorizes. So: the step
    of the lowest validation CE, how far it rose after, and whether any compression came before it."""
    runs = [write_text_log(tmp_path / "b1", "baseline", 1, [5.0, 4.0, 4.5]),        # lowest at 10, rises 0.5
            write_text_log(tmp_path / "g1", "gapt", 1, [5.0, 4.0, 4.4], compress_at=[15]),  # after the lowest
            write_text_log(tmp_path / "g2", "gapt", 2, [5.0, 4.2, 4.0], compress_at=[5]),   # before it
            write_text_log(tmp_path / "b2", "baseline", 2, [5.0, 4.1, 3.9]),        # still learning at the end
            write_text_log(tmp_path / "i1", "iblm", 1, [5.0, 4.6, 4.3])]            # compresses from step 0
    metrics = {os.path.basename(d): report.final_metrics(d, report.read_run(d)[1]) for d in runs}
    assert [metrics[n]["min_val_ce_iter"] for n in ("b1", "g1", "g2", "b2", "i1")] == [10, 10, 20, 20, 20]
    assert metrics["b1"]["val_ce_rise"] == pytest.approx(0.5) and metrics["b2"]["val_ce_rise"] == 0
    assert metrics["b1"]["val_train_gap"] == pytest.approx(1.0)
    assert [metrics[n]["compressed_before_min"] for n in ("b1", "g1", "g2", "i1")] == [0, 0, 1, 1]
    table = report.summarize_runs(runs)
    # informative only where every baseline of the pairs memorized: seed 1 did, seed 2 did not
    assert paired_row(table, "gapt", "min_val_ce_iter")[:4] == ["2", "no (1/2 memorized)", "min_val_ce_iter",
                                                              "1: +0.0000, 2: +0.0000"]
    assert paired_row(table, "iblm", "min_val_ce")[:2] == ["1", "yes"]

def test_the_report_says_how_soon_batch_noise_alone_ends_a_compression_phase(tmp_path):
    """The tau rule ends a compression phase at the first step whose training CE is (1 + tau) times the
    phase's lowest: a CE that is noisy from batch to batch (few tokens per step) ends it within a few
    steps without any real rise, a quiet one never does."""
    def metrics(name, spread):
        z = np.random.default_rng(1).standard_normal(400)
        rows = [dict(event="start", iter=0, config=dict(mode="gapt", seed=1, warmup_iters=0, tau=0.1, patience_comp=100))]
        rows += [dict(iter=10 * i, phase=1, ce=3.0 * math.exp(spread * v), mbe=1.0) for i, v in enumerate(z, 1)]
        rows += [dict(iter=it, event="phase_change", phase=p) for it, p in ((1000, 2), (1006, 1), (3000, 2), (3010, 1))]
        rows.append(dict(iter=4000, event="eval", val_ce=3.0, train_ce=3.0))
        return report.final_metrics(str(tmp_path / name), rows)
    noisy, quiet = metrics("noisy", 0.08), metrics("quiet", 0.002)
    assert noisy["gate_ce_noise"] == pytest.approx(0.08, rel=0.15)
    assert quiet["gate_ce_noise"] == pytest.approx(0.002, rel=0.15)
    assert 2 <= noisy["noise_phase_steps"] <= 6 and quiet["noise_phase_steps"] == 100  # patience_comp
    assert noisy["compression_phase_steps"] == pytest.approx(8)  # phases of 6 and 10 steps


# ---- bad inputs: one line naming the problem and the fix, and nothing written ----

FORGETTING = [("forgetting.json", "{}")]
BAD_INPUTS = {  # what the user gives: (its arguments from a tmp_path, the message it stops with)
    "an empty log": (lambda t: [runs_arg(make_run(t / "b1", log=""))], "log.jsonl has no start row"),
    "a log of garbage": (lambda t: [runs_arg(make_run(t / "b1", log=GARBAGE))], "has no start row"),
    "a folder that is not there": (lambda t: [runs_arg(make_run(t / "b1"), t / "nowhere")], "nowhere is not there"),
    "a file, not a folder": (lambda t: [runs_arg(make_run(t / "b1"), make_file(t / "notes"))], "notes is a file"),
    "a folder without a log": (lambda t: [runs_arg(t)], "no .*log.jsonl; --runs takes the out_dirs"),
    "the same run twice": (lambda t: [runs_arg(make_run(t / "b1"), f"{t / 'b1'}/")], "names the run .*b1 twice"),
    "a forgetting run first": (lambda t: [runs_arg(make_run(t / "f", files=FORGETTING), make_run(t / "b1"))],
                               "f is a forgetting run .* a command of their own"),
    "a forgetting run later": (lambda t: [runs_arg(make_run(t / "b1"), make_run(t / "f", files=FORGETTING))],
                               "f is a forgetting run"),
    "a run resumed with another mode": (lambda t: [runs_arg(make_run(t / "b1", log=RESUMED_AS_GAPT))],
                                        r"resumed with another --mode \(baseline -> gapt\).*leave it out of --runs"),
    "runs that logged nothing yet": (lambda t: [runs_arg(make_run(t / "b1", log=ONLY_STARTED))], "nothing to draw"),
    "an eval_arithmetic.json of garbage": (
        lambda t: [runs_arg(make_run(t / "b1", files=[("eval_arithmetic.json", "{")]))],
        "eval_arithmetic.json is not JSON .* rerun python sample.py --eval=arithmetic"),
    "another program's eval_arithmetic.json": (
        lambda t: [runs_arg(make_run(t / "b1", files=[("eval_arithmetic.json", "[]")]))],
        "eval_arithmetic.json has no rows"),
    "a forgetting.json of garbage": (lambda t: [runs_arg(make_run(t / "f", files=[("forgetting.json", "nan?")]))],
                                     "forgetting.json is not JSON .* rerun python -m experiments.forgetting"),
    "a --file that is a folder": (lambda t: [runs_arg(make_run(t / "b1")), f"--file={t}"],
                                  "is a folder; name a file in it"),
    "a --file under a file": (lambda t: [runs_arg(make_run(t / "b1")), f"--file={make_file(t / 'notes')}/x.png"],
                              "notes is a file, not a folder; choose another --file"),
    "a --file matplotlib cannot write": (lambda t: [runs_arg(make_run(t / "b1")), f"--file={t / 'figures' / 'x.txt'}"],
                                         "end the figure's name in a format matplotlib writes: .*png"),
}


@needs_matplotlib
@pytest.mark.parametrize("setup, message", BAD_INPUTS.values(), ids=BAD_INPUTS)
def test_bad_inputs_stop_in_one_line_naming_the_fix_and_write_nothing(tmp_path, setup, message):
    argv = setup(tmp_path)
    argv += [] if any(a.startswith("--file=") for a in argv) else [f"--file={tmp_path / 'figures' / 'x.png'}"]
    with pytest.raises(SystemExit, match=message) as stopped:
        report.run_report(gapt.parse_config(argv, report.DEFAULTS, report.RULES))
    assert "\n" not in str(stopped.value)
    assert not (tmp_path / "figures").exists() and not list(tmp_path.rglob("*.png"))


@needs_matplotlib
def test_a_figure_folder_that_cannot_be_written_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    argv = [runs_arg(make_run(tmp_path / "b1")), f"--file={tmp_path / 'figures' / 'x.png'}"]
    monkeypatch.setattr(report.os, "access", lambda path, mode: False)  # as a read-only folder answers
    with pytest.raises(SystemExit, match="is not writable; choose another --file"):
        report.run_report(gapt.parse_config(argv, report.DEFAULTS))
    assert not (tmp_path / "figures").exists()


@needs_matplotlib
def test_the_command_line_reports_a_bad_log_in_one_line_without_a_traceback(tmp_path):
    done = run_program([sys.executable, "-m", "experiments.report", runs_arg(make_run(tmp_path / "b1", log=""))],
                       timeout=300, cwd=HERE)
    assert done.returncode != 0 and done.stderr.startswith("report.py: ") and "has no start row" in done.stderr
    assert done.stderr.strip().count("\n") == 0 and not os.path.exists(tmp_path / "b1" / "runs.png")


@needs_matplotlib
def test_runs_not_yet_evaluated_are_drawn_and_the_report_says_there_is_no_table(tmp_path, capsys):
    run_dir = make_run(tmp_path / "b1", log=ONLY_STARTED)
    append_rows(run_dir, dict(iter=1, ce=3.0, mbe=1.0, phase=1))
    report.run_report(gapt.parse_config([runs_arg(run_dir)], report.DEFAULTS))
    assert f"no evaluation yet in {run_dir}: no table" in capsys.readouterr().out
    assert (tmp_path / "b1" / "runs.png").exists()


def test_a_run_resumed_with_another_setting_is_labelled_by_each_value_it_ran_with(tmp_path):
    write_run_log(tmp_path / "g1", "gapt", 1, mbe_weight=1.0)
    write_run_log(tmp_path / "g2", "gapt", 2, mbe_weight=0.1)
    append_rows(tmp_path / "g2", dict(event="start", iter=10, config=dict(mode="gapt", seed=2, mbe_weight=1.0)))
    runs = [report.read_run(tmp_path / name) for name in ("g1", "g2")]
    assert report.setting_labels(runs) == ["gapt lambda 1.0", "gapt lambda 0.1 -> 1.0"]


# ---- the figure's file and title, the tables' header and single runs ----

@needs_matplotlib
def test_the_figure_goes_into_the_first_runs_folder_unless_file_says_otherwise(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    both = runs_arg(make_run(tmp_path / "b1"), make_run(tmp_path / "g1"))
    report.run_report(gapt.parse_config([both], report.DEFAULTS))
    assert (tmp_path / "b1" / "runs.png").exists() and not (tmp_path / "runs.png").exists()
    assert f"wrote {tmp_path / 'b1' / 'runs.png'}" in capsys.readouterr().out
    report.run_report(gapt.parse_config([both, "--file=figures/x.pdf"], report.DEFAULTS))
    assert (tmp_path / "figures" / "x.pdf").read_bytes()[:4] == b"%PDF"


def test_a_row_of_one_run_prints_its_value_without_a_spread(tmp_path):
    for name, mode, seed, ood in (("b1", "baseline", 1, 2.0), ("b2", "baseline", 2, 4.0), ("g1", "gapt", 1, 2.4)):
        write_run_log(tmp_path / name, mode, seed, ood)
    lines = report.summarize_runs([str(tmp_path / n) for n in ("b1", "b2", "g1")]).splitlines()
    two_runs = next(line for line in lines if line.startswith("| baseline | 2 |"))
    one_run = next(line for line in lines if line.startswith("| gapt | 1 |"))
    assert f"| 3.0000 ± {np.std([2.0, 4.0], ddof=1):.4f} |" in two_runs
    assert "±" not in one_run and "| 2.4000 (+20.0%) |" in one_run


def test_the_header_names_the_final_iter_once_and_each_one_only_when_runs_differ(tmp_path):
    run_dirs = [make_run(tmp_path / "b1"), make_run(tmp_path / "b2")]
    assert report.summarize_runs(run_dirs).startswith("final evaluation at iter 10,")
    append_rows(run_dirs[1], dict(iter=20, event="eval", val_ce=1.0, val_ood_answer_ce=1.0))
    assert report.summarize_runs(run_dirs).startswith("final evaluation at iters 10, 20,")


@needs_matplotlib
def test_the_figure_shades_and_titles_compression_phases_only_when_there_were_some(tmp_path):
    plt = report.import_pyplot()
    write_run_log(tmp_path / "g1", "gapt", 1)
    fig = report.plot_training_runs([str(tmp_path / "g1")])
    assert fig.axes[0].get_title() == "" and not fig.axes[0].patches
    plt.close(fig)
    phases = ((2, 2), (4, 1), (6, 2), (8, 1))  # compressing over steps 2-3 and 6-7
    append_rows(tmp_path / "g1", *(dict(iter=it, event="phase_change", phase=phase) for it, phase in phases))
    fig = report.plot_training_runs([str(tmp_path / "g1")])
    assert "compression phases" in fig.axes[0].get_title() and len(fig.axes[0].patches) == 2
    plt.close(fig)


# -----------------------------------------------------------------------------
# The GPU check (experiments/gpu_check.py)
# -----------------------------------------------------------------------------
def test_the_gpu_check_runs_the_benchmark_and_every_arithmetic_mode_in_its_smoke_version(tmp_path, capsys):
    prepare_data.main(["arithmetic", "--n_train", "2000", "--n_val", "100", "--data_dir", str(tmp_path / "data")])
    cfg = gapt.parse_config([f"--out_dir={tmp_path / 'check'}", f"--data_dir={tmp_path / 'data'}", "--device=cpu",
                             "--smoke=True", "--bench_steps=1", "--bench_rounds=1", "--arith_iters=10"],
                            gpu_check.DEFAULTS)
    result = gpu_check.run_gpu_check(cfg)
    saved = json.loads((tmp_path / "check" / "gpu_check.json").read_text())
    assert saved["bench"]["rows"] == result["bench"]["rows"] and list(saved["arithmetic"]) == list(gpu_check.MODES)
    compressing = {mode: m["compressing"] for mode, m in result["arithmetic"].items()}
    assert compressing["baseline"] == 0 and compressing["iblm"] == 1 and 0 < compressing["gapt"] < 1
    assert all(math.isfinite(m["val_ood_answer_ce"]) for m in result["arithmetic"].values())
    assert "| baseline tok/s |" in capsys.readouterr().out


def smoke_check_config(tmp_path, *args):
    return gpu_check.load_config([f"--out_dir={tmp_path / 'check'}", f"--data_dir={tmp_path / 'data'}",
                                  "--device=cpu", "--smoke=True", *args])


@pytest.mark.parametrize("arg, message", [
    ("--bench_steps=0", "bench_steps must be positive"), ("--bench_rounds=-1", "bench_rounds must be positive"),
    ("--arith_iters=0", "arith_iters must be positive"), ("--data_dir=", "data_dir must be a non-empty path")])
def test_a_gpu_check_value_its_key_cannot_take_stops_naming_the_gpu_checks_own_key(tmp_path, arg, message):
    with pytest.raises(SystemExit, match=message):
        smoke_check_config(tmp_path, arg)


@pytest.mark.parametrize("args, message", [
    (["--device=tpu"], "device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'tpu'"),
    ([], r"dataset 'arithmetic' has no .*train.bin; prepare it with: python prepare_data.py arithmetic")])
def test_the_gpu_check_stops_on_a_bad_device_or_missing_data_before_the_benchmark_writes_anything(tmp_path, args,
                                                                                                  message):
    with pytest.raises(SystemExit, match=message):
        gpu_check.run_gpu_check(smoke_check_config(tmp_path, *args))
    assert not (tmp_path / "check").exists()


@pytest.mark.parametrize("left_there, message", [
    ("check", r"out_dir .* is not a writable folder\); choose another --out_dir"),
    ("check/arith-gapt/ckpt.pt",
     r"out_dir .* holds an earlier check .*arith-gapt/ckpt.pt\): choose another --out_dir, or delete")])
def test_the_gpu_check_stops_before_the_benchmark_on_an_out_dir_that_is_a_file_or_holds_an_earlier_check(
        tmp_path, left_there, message):
    (tmp_path / left_there).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / left_there).write_text("left there")
    with pytest.raises(SystemExit, match=message):
        gpu_check.run_gpu_check(smoke_check_config(tmp_path))
    assert not (tmp_path / "check" / "bench").exists()


def test_the_gpu_check_without_its_data_exits_non_zero_with_one_line_and_writes_nothing(tmp_path):
    done = run_program([sys.executable, "-m", "experiments.gpu_check", "--device=cpu", "--smoke=True",
                        f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'check'}"], timeout=300, cwd=HERE)
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("gpu_check.py: dataset 'arithmetic' has no ")
    assert not (tmp_path / "check").exists()


# -----------------------------------------------------------------------------
# The launch check and the thread measurement (experiments/launch_check.py, experiments/threads.py)
# -----------------------------------------------------------------------------
@pytest.mark.parametrize("program, arg, message", [
    ("launch_check", "--steps=0", "steps must be positive"), ("launch_check", "--dtype=float16", "dtype must be one of"),
    ("threads", "--toy_steps=-1", "toy_steps must be positive"),
    ("threads", "--thread_counts=1,two", "thread_counts must be positive counts, comma-separated")])
def test_the_checks_and_the_thread_measurement_refuse_bad_keys_before_any_work(program, arg, message):
    module = dict(launch_check=launch_check, threads=threads)[program]
    with pytest.raises(SystemExit, match=message):
        gapt.parse_config([arg], module.DEFAULTS, module.RULES)


# -----------------------------------------------------------------------------
# Speed against nanoGPT (experiments/vs_nanogpt.py): a fake nanoGPT checkout, no network
# -----------------------------------------------------------------------------
FAKE_NANOGPT = """
import os, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
assert os.path.isfile("configurator.py") and os.path.isfile(f"data/{args['dataset']}/train.bin"), os.getcwd()
print(f"pid {os.getpid()}", flush=True)
print(f"malloc {os.environ.get('MALLOC_MMAP_MAX_')} {os.environ.get('MALLOC_TRIM_THRESHOLD_')}")
mode = os.environ.get("FAKE_MODE", "")
if mode == "hang":
    import subprocess
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a grandchild in its session
print("step 0: train loss 10.8470, val loss 10.8417")
for i in range(int(args["max_iters"]) + 1):  # nanoGPT runs iterations 0..max_iters
    print(f"iter {i}: loss 10.8481, time {100 + i}.00ms, mfu -100.00%", flush=True)
    if mode == "hang":
        time.sleep(60)
if mode == "crash":
    raise SystemExit("train.py: out of luck")
"""


def live_processes_in_group(group):
    """Pids of the processes of a process group that still run (Linux /proc)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                state, _, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
        except OSError:
            continue
        if int(pgrp) == group and state != "Z":
            pids.append(int(pid))
    return pids


def fake_nanogpt(tmp_path):
    folder = tmp_path / "nanoGPT"
    folder.mkdir()
    (folder / "train.py").write_text(FAKE_NANOGPT)
    (folder / "configurator.py").write_text("")
    return folder


def vs_config(tmp_path, **overrides):
    settings = dict(nanogpt_dir=fake_nanogpt(tmp_path), data_dir=tmp_path / "data", dataset="tiny",
                    out_dir=tmp_path / "out", steps=5, warmup=2)
    settings.update(overrides)
    return vs_nanogpt.load_config([f"--{k}={v}" for k, v in settings.items()])


def test_vs_nanogpt_reads_nanogpts_step_times_from_its_own_working_folder(tmp_path, data):
    cfg = vs_config(tmp_path)
    os.makedirs(cfg.out_dir)
    steps = vs_nanogpt.run_once(cfg, "nanogpt", str(tmp_path / "out" / "nanogpt-round1"))
    assert [ms for ms, _ in steps] == [102.0, 103.0, 104.0]  # 5 steps, the first 2 left out
    assert all(cpu is None or cpu >= 0 for _, cpu in steps)
    assert not os.path.exists(tmp_path / "out" / "nanogpt-round1")  # only its output is kept
    assert "iter 4:" in (tmp_path / "out" / "nanogpt-round1.txt").read_text()


@pytest.mark.parametrize("same_allocator, line", [(False, "malloc None None"), (True, f"malloc 0 {2 ** 31 - 1}")])
def test_vs_nanogpt_gives_nanogpt_gapts_allocator_setting_when_asked(tmp_path, data, same_allocator, line, monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    cfg = vs_config(tmp_path, same_allocator=same_allocator)
    os.makedirs(cfg.out_dir)
    vs_nanogpt.run_once(cfg, "nanogpt", str(tmp_path / "out" / "nanogpt-round1"))
    assert line in (tmp_path / "out" / "nanogpt-round1.txt").read_text().splitlines()


def test_vs_nanogpt_runs_gapt_with_no_mbe_computed_and_reads_its_step_times(tmp_path):
    write_dataset(str(tmp_path / "data"))
    cfg = vs_config(tmp_path, n_layer=1, n_head=1, n_embd=8, block_size=8, batch_size=2, steps=3, warmup=1)
    os.makedirs(cfg.out_dir)
    steps = vs_nanogpt.run_once(cfg, "gapt_no_mbe", str(tmp_path / "out" / "gapt_no_mbe-round1"))
    assert len(steps) == 2 and all(ms > 0 for ms, _ in steps)
    output = (tmp_path / "out" / "gapt_no_mbe-round1.txt").read_text()
    assert "| mbe 0.0000 |" in output and "event eval" in output  # MBE replaced by a zero; evaluated after the steps


def test_vs_nanogpt_gives_both_programs_the_same_model_and_gapt_no_evaluation_or_probe_between_steps(tmp_path, data):
    cfg = vs_config(tmp_path)
    argv = {name: vs_nanogpt.commands(cfg, name, str(tmp_path / "run"))[0] for name in vs_nanogpt.VARIANTS}
    shared = {f"--{k}={cfg[k]}" for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "bias")}
    shared |= {"--dropout=0.0", "--dtype=float32", "--compile=False", "--device=cpu", "--gradient_accumulation_steps=1"}
    for name, command in argv.items():
        assert shared <= set(command), name
    assert "--max_iters=4" in argv["nanogpt"] and "--max_iters=5" in argv["gapt"]  # 5 steps each
    assert {"--mode=baseline", "--align_interval=0", "--eval_interval=1000000000"} <= set(argv["gapt"])
    assert argv["gapt_no_mbe"][1] == "-c" and argv["gapt_no_mbe"][3:] == argv["gapt"][2:]


def test_vs_nanogpt_alternates_the_variants_and_reports_ratios_per_round_and_overall(tmp_path, data, monkeypatch):
    order = []
    ms = dict(nanogpt=100.0, gapt=80.0, gapt_no_mbe=78.0)

    def fake_run(cfg, name, run_dir):
        order.append(name)
        return [(ms[name], 2 * ms[name])] * 3

    monkeypatch.setattr(vs_nanogpt, "run_once", fake_run)
    write_dataset(str(tmp_path / "data"), name="bpe", vocab_size=50257)  # GPT-2's: 50304 in both programs
    rows = vs_nanogpt.main(vs_config(tmp_path, rounds=3, dataset="bpe"))
    forward = ["nanogpt", "gapt", "gapt_no_mbe"]
    assert order == forward + forward[::-1] + forward
    assert [r["round"] for r in rows] == [1, 2, 3, "all"]
    for row in rows:
        assert row["speed_vs_nanogpt_ms"] == row["speed_vs_nanogpt_cpu_ms"] == 1.25
        assert row["mbe_overhead_ms"] == round(80 / 78, 4)
    saved = json.loads((tmp_path / "out" / "vs_nanogpt.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and len(saved["steps"]) == 3


def test_vs_nanogpt_stops_with_the_output_when_a_program_fails(tmp_path, data, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "crash")
    cfg = vs_config(tmp_path)
    os.makedirs(cfg.out_dir)
    message = stops(vs_nanogpt.run_once, cfg, "nanogpt", str(tmp_path / "out" / "nanogpt-round1"))
    assert "nanogpt exited with 1 after 5 of 5 steps" in message and "out of luck" in message
    assert "nanogpt-round1.txt" in message


def test_vs_nanogpt_kills_the_program_and_what_it_started_when_interrupted(tmp_path, data, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "hang")
    calls = []

    def interrupt_at_the_first_step(pid):  # called once at the start, then at each step's line
        calls.append(pid)
        if len(calls) > 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(vs_nanogpt, "cpu_seconds", interrupt_at_the_first_step)
    cfg = vs_config(tmp_path)
    os.makedirs(cfg.out_dir)
    with pytest.raises(KeyboardInterrupt):
        vs_nanogpt.run_once(cfg, "nanogpt", str(tmp_path / "out" / "nanogpt-round1"))
    session = int((tmp_path / "out" / "nanogpt-round1.txt").read_text().split()[1])
    for _ in range(50):  # the whole session goes, the sleeping grandchild too (zombies aside)
        if not live_processes_in_group(session):
            break
        time.sleep(0.05)
    assert not live_processes_in_group(session)


@pytest.mark.parametrize("override, message", [
    (dict(nanogpt_dir="nowhere"), "holds no nanoGPT train.py"),
    (dict(warmup=5), "warmup (5) must be less than steps (5)"),
    (dict(dataset="missing"), "missing/train.bin not found"),
    (dict(dataset="tiny"), "gives gapt a vocabulary of 32"),  # a GPT-2 vocabulary is 50304 in both
    (dict(n_head=3), "n_embd (128) must be a multiple of n_head (3)"),
])
def test_vs_nanogpt_stops_on_bad_input_naming_the_fix(tmp_path, data, override, message):
    cfg = vs_config(tmp_path)
    cfg.update({k: str(tmp_path / v) if k == "nanogpt_dir" else v for k, v in override.items()})
    assert message in stops(vs_nanogpt.main, cfg)
    assert not os.path.exists(tmp_path / "out")


def test_vs_nanogpt_rejects_unknown_keys_and_wrong_types():
    assert "unknown config key 'max_iters'" in stops(vs_nanogpt.load_config, ["--max_iters=3"])
    assert "rounds must be positive" in stops(vs_nanogpt.load_config, ["--rounds=0"])
    assert "steps must be int" in stops(vs_nanogpt.load_config, ["--steps=many"])
