"""
sample.py: sample text from a model trained by gapt.py, or measure its arithmetic.

    python sample.py --out_dir=out --start="The meaning of life is" --num_samples=3
    python sample.py --out_dir=out-arith --start=FILE:prompt.txt --temperature=0
    python sample.py --out_dir=out-arith --eval=arithmetic --n=1000

The tokenizer is the one of the dataset the checkpoint was trained on (its meta.json): GPT-2 BPE
for text, the character vocabulary for arithmetic. --eval=arithmetic decodes the answer of every
prompt `a*b=` greedily, in distribution (val, 1-3 digit operands) and out of distribution
(val_ood, 4-6 digits): the paper's generalization result. Options are --key=value, as in gapt.py.
"""

import json
import math
import os
import re
import shlex
import sys

import tiktoken
import torch
import torch.nn.functional as F

import gapt
import prepare_data

# -----------------------------------------------------------------------------
# Config
# -----------------------------------------------------------------------------
SAMPLE_DEFAULTS = dict(
    out_dir="out",  # the training run to load: out_dir/ckpt.pt
    data_dir="",  # root of the run's dataset; "" = the run's own data_dir (relative to where it trained)
    device="auto",  # 'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', 'mps'
    # sampling
    start="\n",  # the prompt, or FILE:path to read it from a file
    num_samples=3,  # samples drawn from the prompt
    max_new_tokens=200,  # tokens generated per sample
    temperature=0.8,  # < 1 sharpens the distribution, > 1 flattens it; 0 = greedy
    top_k=200,  # sample among the top_k most likely tokens only; 0 = among all
    seed=1337,  # the same seed gives the same samples
    # evaluation instead of sampling
    eval="",  # 'arithmetic': exact match and answer CE on val and val_ood, written to out_dir
    n=1000,  # --eval: the first n examples of each split
)


def load_sample_config(argv):
    cfg = gapt.parse_config(argv, SAMPLE_DEFAULTS)
    if cfg.eval not in ("", "arithmetic"):
        raise gapt.ConfigError(f"eval must be '' (sample) or 'arithmetic', got {cfg.eval!r}")
    for key in ("num_samples", "max_new_tokens", "n"):
        if cfg[key] <= 0:
            raise gapt.ConfigError(f"{key} must be positive, got {cfg[key]}")
    if cfg.temperature < 0:
        raise gapt.ConfigError(f"temperature must be >= 0 (0 is greedy), got {cfg.temperature}")
    if cfg.top_k < 0:
        raise gapt.ConfigError(f"top_k must be >= 0 (0 = sample among all tokens), got {cfg.top_k}")
    return cfg


# -----------------------------------------------------------------------------
# The trained model and the tokenizer of its dataset
# -----------------------------------------------------------------------------
def load_model(out_dir, device):
    """The model of out_dir/ckpt.pt in eval mode, and the checkpoint (its config names the dataset)."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        raise SystemExit(f"sample.py: no checkpoint at {path}; train one with python gapt.py --out_dir={out_dir} "
                         f"or point --out_dir at a finished run")
    checkpoint = gapt.load_checkpoint(path, device)
    model = gapt.GPT(gapt.GPTConfig(**{k: checkpoint["config"][k] for k in gapt.MODEL_KEYS}))
    gapt.load_weights(model, checkpoint["model"])
    return model.to(device).eval(), checkpoint


def char_tokenizer(chars):
    """Character vocabulary: the id of a character is its index in meta.json's list."""
    stoi = {c: i for i, c in enumerate(chars)}

    def encode(text):
        unknown = sorted(set(text) - set(stoi))
        if unknown:
            raise SystemExit(f"sample.py: the prompt has characters outside the model's character vocabulary: "
                             f"{', '.join(map(repr, unknown))}; use only {''.join(chars)!r}")
        return [stoi[c] for c in text]

    return encode, lambda ids: "".join(chars[i] for i in ids)


def gpt2_tokenizer():
    enc = tiktoken.get_encoding("gpt2")
    # the model's vocabulary is padded to 50304 for speed: an undertrained model may still pick
    # one of the 47 padding ids, which are no GPT-2 token, so decoding skips them
    return (lambda text: enc.encode(text, allowed_special={"<|endoftext|>"}),
            lambda ids: enc.decode([i for i in ids if i < enc.n_vocab]))


def tokenizer_for(meta, model, meta_path):
    """(encode, decode) of the run's dataset; GPT-2 BPE when its meta.json is not found."""
    vocab_size = model.config.vocab_size
    if meta is None:
        if vocab_size < 50257:
            raise SystemExit(f"sample.py: {meta_path} not found, and the model's vocabulary ({vocab_size}) is too "
                             f"small for GPT-2 BPE; point --data_dir at the folder that holds the run's dataset")
        return gpt2_tokenizer()
    if meta["vocab_size"] > vocab_size:
        raise SystemExit(f"sample.py: {meta_path} has a vocabulary of {meta['vocab_size']}, larger than the model's "
                         f"({vocab_size}): the checkpoint was trained on another dataset; check --data_dir")
    if isinstance(meta["tokenizer"], list):
        return char_tokenizer(meta["tokenizer"])
    return gpt2_tokenizer()


# -----------------------------------------------------------------------------
# Sampling
# -----------------------------------------------------------------------------
def read_prompt(start):
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    if not os.path.isfile(path):
        raise SystemExit(f"sample.py: prompt file {path} not found; fix --start=FILE:path or pass the text itself")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise SystemExit(f"sample.py: prompt file {path} is not UTF-8 text; convert it, e.g. with "
                         f"iconv -f latin1 -t utf-8") from None


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, stop_token=None):
    """Extend idx (B, T) with the model's tokens. temperature=0 means greedy. Stops early once every row has
    produced stop_token (rows that finished keep generating; callers cut at stop_token)."""
    finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits, _, _ = model(idx[:, -model.config.block_size:])  # wpe has only block_size positions
        logits = logits[:, -1, :]
        if temperature == 0:
            next_token = logits.argmax(dim=-1, keepdim=True)
        else:
            # the largest logit becomes 0 first, so that no temperature, however small, overflows it
            logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits[logits < kth] = -float("inf")
            next_token = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
        idx = torch.cat((idx, next_token), dim=1)
        if stop_token is not None:
            finished |= next_token.squeeze(1) == stop_token
            if finished.all():
                break
    return idx


def generate_samples(model, prompt_ids, cfg, device):
    """num_samples continuations of the prompt, drawn in one batch, as token lists (prompt included)."""
    if not prompt_ids:
        raise SystemExit("sample.py: the prompt is empty; give the model something to continue with --start")
    torch.manual_seed(cfg.seed)  # seeds the CUDA generators too
    x = torch.tensor([prompt_ids] * cfg.num_samples, dtype=torch.long, device=device)
    y = generate(model, x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None)
    return y.tolist()


# -----------------------------------------------------------------------------
# Arithmetic evaluation: greedy answers to `a*b=`, scored against the true products
# -----------------------------------------------------------------------------
@torch.no_grad()
def greedy_answers(model, prompts, eot_token, device, batch_size=256):
    """The greedy continuation of each prompt up to its first eot_token (excluded), as token lists.
    Only prompts of the same length share a batch: with learned positions, padding a prompt would
    move its tokens to other positions. A product has no more digits than its two factors together,
    so len(prompt) new tokens hold any right answer and its eot; a model that never stops is cut there."""
    answers = [None] * len(prompts)
    by_length = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    for length, rows in sorted(by_length.items()):
        for first in range(0, len(rows), batch_size):
            batch = rows[first:first + batch_size]
            idx = torch.tensor([prompts[i] for i in batch], dtype=torch.long, device=device)
            out = generate(model, idx, max_new_tokens=length, temperature=0, stop_token=eot_token)
            for i, new in zip(batch, out[:, length:].tolist()):
                # a row that finished early kept generating until the whole batch had: cut it at its eot
                answers[i] = new[:new.index(eot_token)] if eot_token in new else new
    return answers


def evaluate_arithmetic(model, examples, sep_token, eot_token, decode, device):
    """Scores on examples (token lists `a*b=c\\n`): exact match of the greedy answer string with
    the true product, answer CE (teacher-forced, gapt.answer_ce) of each example alone and, where the
    model's context holds two of the longest examples, in context (gapt.answer_ce_in_context), and the
    mean absolute difference in digits between the greedy answer and the true one (length error: does
    it get the size right?) and the mean signed one (length bias: below 0, it ends its answers too early)."""
    prompts = [ex[:ex.index(sep_token) + 1] for ex in examples]
    truths = [decode(ex[len(prompt):-1]) for ex, prompt in zip(examples, prompts)]
    guesses = [decode(answer) for answer in greedy_answers(model, prompts, eot_token, device)]
    right = [g == t for g, t in zip(guesses, truths)]
    scores = dict(examples=len(examples),
                  exact_match=sum(right) / len(examples),
                  answer_ce=gapt.answer_ce(model, examples, sep_token, device),
                  length_error=sum(abs(len(g) - len(t)) for g, t in zip(guesses, truths)) / len(examples),
                  length_bias=sum(len(g) - len(t) for g, t in zip(guesses, truths)) / len(examples),
                  exact_match_by_digits=exact_match_by_digits([decode(p[1:-1]) for p in prompts], right))  # `\na*b=` -> `a*b`
    in_context = gapt.answer_ce_in_context(model, examples, sep_token, device, model.config.block_size)
    if math.isfinite(in_context):
        scores["answer_ce_in_context"] = in_context
    return scores


def exact_match_by_digits(questions, right):
    """Exact match per operand size, e.g. {"1x3": 0.4}: which products a model has learned, where one
    overall number mixes 1-digit tables with 3 x 3-digit products. "1x3" counts 3*456 and 456*3."""
    counts = {}
    for question, ok in zip(questions, right):
        operands = re.findall(r"[0-9]+", question)  # `12*34` or the author's `<bos>12 x 34 `
        key = "x".join(str(n) for n in sorted(len(operand) for operand in operands))
        hits, total = counts.get(key, (0, 0))
        counts[key] = (hits + ok, total + 1)
    return {key: hits / total for key, (hits, total) in sorted(counts.items())}


def load_arithmetic_splits(data_dir, dataset, meta, n, checkpoint_path):
    """The first n examples of val and val_ood, or an error if the run was not trained on arithmetic."""
    meta_path = os.path.join(data_dir, dataset, "meta.json")
    if meta is None:
        raise SystemExit(f"sample.py: --eval=arithmetic needs {meta_path} (the run's dataset); point --data_dir "
                         f"at the folder that holds '{dataset}', or prepare it with python prepare_data.py arithmetic")
    answer_sets = prepare_data.answer_sets(data_dir, dataset, meta, n)
    if not answer_sets:
        tokenizer = "GPT-2 BPE" if meta["tokenizer"] == "gpt2" else f"the characters {''.join(meta['tokenizer'])!r}"
        raise SystemExit(f"sample.py: --eval=arithmetic needs a model trained on arithmetic data, but {checkpoint_path} "
                         f"was trained on dataset '{dataset}' ({tokenizer}); train one with "
                         f"python gapt.py --dataset=arithmetic")
    for split in ("val", "val_ood"):
        if split not in answer_sets:
            raise SystemExit(f"sample.py: {os.path.join(data_dir, dataset, split + '.bin')} not found; "
                             f"re-create the dataset with python prepare_data.py arithmetic")
    return answer_sets


def format_table(rows):
    """A Markdown table: readable in a terminal, and pasted as is into the README."""
    lines = ["| split | examples | exact match | answer CE | answer CE in context | length error | length bias |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['split']} | {r['examples']} | {r['exact_match']:.3f} | {r['answer_ce']:.3f} | "
              f"{r.get('answer_ce_in_context', math.nan):.3f} | {r['length_error']:.3f} | {r['length_bias']:+.3f} |" for r in rows]
    lines += ["", "exact match by operand digits:"]
    lines += [f"  {r['split']}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["exact_match_by_digits"].items())
              for r in rows]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Entry point
# -----------------------------------------------------------------------------
def main(argv=None):
    """Prints samples (returns their text) or the arithmetic table (returns its rows)."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = load_sample_config(argv)
    device = gapt.check_device(cfg.device)
    model, checkpoint = load_model(cfg.out_dir, device)
    dataset = checkpoint["config"]["dataset"]
    data_dir = cfg.data_dir or checkpoint["config"]["data_dir"]
    meta_path = os.path.join(data_dir, dataset, "meta.json")
    meta = prepare_data.read_meta(data_dir, dataset)

    if cfg.eval == "arithmetic":
        checkpoint_path = os.path.join(cfg.out_dir, "ckpt.pt")
        answer_sets = load_arithmetic_splits(data_dir, dataset, meta, cfg.n, checkpoint_path)
        _, decode = tokenizer_for(meta, model, meta_path)
        print(f"{checkpoint_path} (iter {checkpoint['iter_num']}): greedy answers to the first {cfg.n} "
              f"examples of each split")
        rows = [dict(split=split, **evaluate_arithmetic(model, examples, sep_token, meta["eot_token"], decode, device))
                for split, (examples, sep_token) in answer_sets.items()]
        print(format_table(rows))
        result_path = os.path.join(cfg.out_dir, "eval_arithmetic.json")
        with open(result_path, "w") as f:
            json.dump(dict(command=shlex.join(["python", "sample.py", *argv]), iter_num=checkpoint["iter_num"],
                           dataset=dataset, rows=rows), f, indent=2)
        print(f"wrote {result_path}")
        return rows

    encode, decode = tokenizer_for(meta, model, meta_path)
    samples = [decode(ids) for ids in generate_samples(model, encode(read_prompt(cfg.start)), cfg, device)]
    for text in samples:
        print(text)
        print("---------------")
    return samples


if __name__ == "__main__":
    main()
