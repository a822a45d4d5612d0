"""
sample.py: sample text from a model trained by gapt.py, or measure it.

    python sample.py --out_dir=out --start="The meaning of life is" --num_samples=3
    python sample.py --out_dir=out-arith --start=FILE:prompt.txt --temperature=0
    python sample.py --out_dir=out-arith --eval=arithmetic --n=1000
    python sample.py --out_dir=out --eval=val

The tokenizer is the one of the dataset the checkpoint was trained on (its meta.json): GPT-2 BPE
for text, the character vocabulary for arithmetic. A sample ends where the model ends its document
or example, at the dataset's end token (--stop_at_end=False writes on through). --eval=arithmetic
decodes the answer of every prompt `a*b=` greedily, in distribution (val, 1-3 digit operands) and
out of distribution (val_ood, 4-6 digits): the paper's generalization result. --eval=val measures
the validation CE and MBE over the whole val split, where training's log reads eval_iters batches
of it. Options are --key=value, as in gapt.py.
"""

import json
import math
import os
import re
import shlex
import sys
import time

import numpy as np
import tiktoken
import torch
import torch.nn.functional as F
from tqdm import tqdm

import gapt
import prepare_data
from prepare_data import stop

# -----------------------------------------------------------------------------
# Config
# -----------------------------------------------------------------------------
SAMPLE_DEFAULTS = dict(
    out_dir="out",  # the training run to load: out_dir/ckpt.pt
    data_dir="",  # root of the run's dataset; "" = the run's own data_dir (relative to where it trained)
    device="auto",  # 'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', 'mps'
    threads=0,  # CPU threads; 0 = auto, as gapt.py's threads (the cores but one)
    # sampling
    start="",  # the prompt, or FILE:path to read it from; "" = the end token: a new document or example
    num_samples=3,  # samples drawn from the prompt (one when greedy)
    max_new_tokens=200,  # tokens generated per sample, at most
    stop_at_end=True,  # end each sample where the model ends its document or example; False = write on through
    temperature=0.8,  # < 1 sharpens the distribution, > 1 flattens it; 0 = greedy
    top_k=200,  # sample among the top_k most likely tokens only; 0 = among all
    seed=1337,  # the same seed gives the same samples
    # evaluation instead of sampling
    eval="",  # 'arithmetic': exact match and answer CE on val and val_ood; 'val': CE and MBE of the whole val split
    n=1000,  # --eval=arithmetic: the first n examples of each split (all of a split that holds fewer)
)
# --eval reads none of these
SAMPLING_KEYS = ("start", "num_samples", "max_new_tokens", "stop_at_end", "temperature", "top_k", "seed")


SAMPLE_RULES = {
    **gapt.rule(lambda v: v > 0, "positive", ("num_samples", "max_new_tokens", "n")),
    **gapt.rule(lambda v: v >= 0, ">= 0 (0 = auto: the cores but one)", ("threads",)),
    **gapt.rule(lambda v: v >= 0, ">= 0 (temperature 0 is greedy, top_k 0 samples among all tokens)",
                ("temperature", "top_k")),
    **gapt.rule(lambda v: 0 <= v < 2**64, "in [0, 2**64), the seeds torch takes", ("seed",)),
    **gapt.rule(lambda v: v in ("", "arithmetic", "val"), "'' (sample), 'arithmetic' or 'val'", ("eval",)),
}


def load_sample_config(argv):
    cfg = gapt.parse_config(argv, SAMPLE_DEFAULTS, SAMPLE_RULES)
    # an option the chosen mode never reads would change nothing: say so rather than ignore it
    unread = [key for key in SAMPLING_KEYS if cfg.eval and cfg[key] != SAMPLE_DEFAULTS[key]]
    if unread:
        stop(f"--eval={cfg.eval} reads no sampling option, but got --{unread[0]}; "
             f"drop it, or leave out --eval to sample")
    if cfg.eval != "arithmetic" and cfg.n != SAMPLE_DEFAULTS["n"]:
        stop(f"--n={cfg.n} counts the examples of --eval=arithmetic; use --eval=arithmetic or drop --n")
    return cfg


# -----------------------------------------------------------------------------
# The trained model and the tokenizer of its dataset
# -----------------------------------------------------------------------------
def load_model(out_dir, device):
    """The model of out_dir/ckpt.pt in eval mode, and the checkpoint (its config names the dataset)."""
    path = os.path.join(out_dir, "ckpt.pt")
    if os.path.isfile(out_dir):
        stop(f"--out_dir={out_dir} is a file; point --out_dir at the folder of a run, the one that holds ckpt.pt")
    fix = f"train one with python gapt.py --out_dir={out_dir}"
    if not os.path.exists(path):
        stop(f"no checkpoint at {path}; {fix} or point --out_dir at a finished run")
    checkpoint = gapt.load_checkpoint(path, device, fix)
    model = gapt.GPT(gapt.GPTConfig(**{k: checkpoint["config"][k] for k in gapt.MODEL_KEYS}))
    gapt.load_weights(model, checkpoint["model"], fix)
    return model.to(device).eval(), checkpoint


def char_tokenizer(chars):
    """Character vocabulary: the id of a token is its index in meta.json's list. A prompt spells the
    author's <bos> and <eos> out, as a GPT-2 prompt spells <|endoftext|>."""
    stoi = {c: i for i, c in enumerate(chars)}
    # longest first, so that <bos> is read as one token, not as '<' 'b' 'o' 's' '>'
    token = re.compile("|".join(re.escape(c) for c in sorted(chars, key=len, reverse=True)) + "|.", re.DOTALL)

    def encode(text):
        pieces = token.findall(text)
        unknown = sorted(set(pieces) - set(stoi))
        if unknown:
            spelled = [c for c in chars if len(c) > 1]
            stop(f"the prompt has characters outside the model's vocabulary: {', '.join(map(repr, unknown))}; "
                 f"use only {''.join(c for c in chars if len(c) == 1)!r}"
                 + (f" and the tokens {', '.join(spelled)}" if spelled else ""))
        return [stoi[p] for p in pieces]

    return encode, lambda ids: "".join(chars[i] for i in ids)


def gpt2_tokenizer():
    enc = tiktoken.get_encoding("gpt2")
    # the model's vocabulary is padded to 50304 for speed: an undertrained model may still pick
    # one of the 47 padding ids, which are no GPT-2 token, so decoding skips them
    return (lambda text: enc.encode(text, allowed_special={"<|endoftext|>"}),
            lambda ids: enc.decode([i for i in ids if i < enc.n_vocab]), enc.eot_token)


def tokenizer_for(meta, model, meta_path):
    """(encode, decode, the token that ends a document or example) of the run's dataset; GPT-2 BPE
    when its meta.json is not found."""
    vocab_size = model.config.vocab_size
    if meta is None:
        if vocab_size < 50257:
            stop(f"{meta_path} not found, and the model's vocabulary ({vocab_size}) is too "
                 f"small for GPT-2 BPE; point --data_dir at the folder that holds the run's dataset")
        return gpt2_tokenizer()
    if gapt.model_vocab_size(model.config, meta) != vocab_size:  # as gapt.py sized the model for this dataset
        stop(f"{meta_path} has a vocabulary of {meta['vocab_size']} tokens, the model {vocab_size}: the "
             f"checkpoint was trained on another dataset; point --data_dir at the one it was trained on")
    if isinstance(meta["tokenizer"], list):
        return (*char_tokenizer(meta["tokenizer"]), meta["eot_token"])
    return gpt2_tokenizer()


# -----------------------------------------------------------------------------
# Sampling
# -----------------------------------------------------------------------------
def read_prompt(start):
    """The prompt text; "" for none (the model then starts from the dataset's end token)."""
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    if not path:
        stop("--start=FILE: names no file; write --start=FILE:path/to/prompt.txt")
    if not os.path.isfile(path):
        stop(f"prompt file {path} not found; fix --start=FILE:path or pass the text itself")
    try:
        with open(path, encoding="utf-8") as f:
            # not the newline an editor ends a file with: after `12*34=` it would end the question unanswered
            text = f.read().removesuffix("\n")
    except UnicodeDecodeError:
        stop(f"prompt file {path} is not UTF-8 text; convert it, e.g. with "
             f"iconv -f latin1 -t utf-8")
    if not text:
        stop(f"prompt file {path} is empty; write the prompt into it, or leave out --start to sample "
             f"from the start of a document")
    return text


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
            # the largest logit becomes 0 first, so that no temperature, however small, overflows it; and
            # none is below float32's smallest normal number, which a CPU that flushes denormals (as after
            # torch.compile's fast-math kernels were loaded) would read as 0, and 0 / 0 is NaN
            tiny = torch.finfo(logits.dtype).tiny
            logits = (logits - logits.max(dim=-1, keepdim=True).values) / max(temperature, tiny)
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


def cut_at(ids, token):
    """ids up to the first token, which is left out; all of them if it never comes."""
    return ids[:ids.index(token)] if token in ids else ids


def generate_samples(model, prompt_ids, cfg, eot_token, device):
    """num_samples continuations of the prompt, drawn in one batch, as token lists (prompt left out),
    each cut at its first eot_token when cfg.stop_at_end."""
    torch.manual_seed(cfg.seed)  # seeds the CUDA generators too
    x = torch.tensor([prompt_ids] * cfg.num_samples, dtype=torch.long, device=device)
    stop_token = eot_token if cfg.stop_at_end else None
    y = generate(model, x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                 stop_token=stop_token)
    return [cut_at(ids, stop_token) for ids in y[:, len(prompt_ids):].tolist()]


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
                answers[i] = cut_at(new, eot_token)
    return answers


def evaluate_arithmetic(model, examples, sep_token, eot_token, decode, device):
    """Scores on examples (token lists `a*b=c\\n`): exact match of the greedy answer string with
    the true product; the teacher-forced scores of prepare_data.answer_scores: the answer CE, its parts per
    digit position counted from the leading digit and from the last, and the CE of the end token; the
    answer CE in context (prepare_data.answer_ce_in_context) where the model's context holds two of the
    longest examples; the mean absolute difference in digits between the greedy answer and the true
    one (length error: does it get the size right?) and the mean signed one (length bias: below 0, it
    ends its answers too early); and the share of greedy answers whose leading digit, leading two
    digits (as a string: a one-digit product's are right only if the answer stops after it) and last
    digit are the product's."""
    prompts = [ex[:ex.index(sep_token) + 1] for ex in examples]
    truths = [decode(ex[len(prompt):-1]) for ex, prompt in zip(examples, prompts)]
    guesses = [decode(answer) for answer in greedy_answers(model, prompts, eot_token, device)]
    right = [g == t for g, t in zip(guesses, truths)]
    # the products as written, without the space the author's format puts after '='
    pairs = [(g.lstrip(), t.lstrip()) for g, t in zip(guesses, truths)]
    digits = {token for ex in examples for token in ex if decode([token]).isdigit()}
    scores = dict(examples=len(examples),
                  exact_match=sum(right) / len(examples),
                  **prepare_data.answer_scores(model, examples, sep_token, digits, device),
                  length_error=sum(abs(len(g) - len(t)) for g, t in zip(guesses, truths)) / len(examples),
                  length_bias=sum(len(g) - len(t) for g, t in zip(guesses, truths)) / len(examples),
                  leading_digit_accuracy=sum(g[:1] == t[:1] for g, t in pairs) / len(examples),
                  leading_two_digits_accuracy=sum(g[:2] == t[:2] for g, t in pairs) / len(examples),
                  last_digit_accuracy=sum(g[-1:] == t[-1:] for g, t in pairs) / len(examples),
                  exact_match_by_digits=exact_match_by_digits([decode(p[1:-1]) for p in prompts], right))  # `\na*b=` -> `a*b`
    in_context = prepare_data.answer_ce_in_context(model, examples, sep_token, device, model.config.block_size)
    if math.isfinite(in_context):
        scores["answer_ce_in_context"] = in_context
    return scores


def why_no_answer_ce_in_context(examples, window):
    """Why prepare_data.answer_ce_in_context has no number (nan) for these examples, in words."""
    longest = max(len(ex) for ex in examples) - 1  # in the stream, an example's leading eot is the one before it
    if longest > window // 2:
        return (f"the model's window ({window} tokens) must hold two of the longest examples ({longest} tokens "
                f"each); only a model trained with a block_size of {2 * longest} or more is scored in context")
    return f"the examples scored fill less than one window of the model ({window} tokens); raise --n"


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
        stop(f"--eval=arithmetic needs {meta_path} (the run's dataset); point --data_dir "
             f"at the folder that holds '{dataset}', or prepare it with python prepare_data.py arithmetic")
    answer_sets = prepare_data.answer_sets(data_dir, dataset, meta, n)
    if not answer_sets:
        tokenizer = "GPT-2 BPE" if meta["tokenizer"] == "gpt2" else f"the characters {''.join(meta['tokenizer'])!r}"
        stop(f"--eval=arithmetic needs a model trained on arithmetic data, but {checkpoint_path} "
             f"was trained on dataset '{dataset}' ({tokenizer}); train one with "
             f"python gapt.py --dataset=arithmetic")
    return answer_sets  # val and val_ood both, checked (answer_sets stops on a missing or damaged one)


# -----------------------------------------------------------------------------
# Validation evaluation: CE and MBE over the whole val split
# -----------------------------------------------------------------------------
@torch.no_grad()
def evaluate_split(model, tokens, device, batch_size=16):
    """The mean CE and each block's patch MBE over consecutive windows of tokens (a numpy array), the
    tail shorter than a window left out. Training's log reads eval_iters random batches instead: the
    same ones for every run of a seed, so runs of a seed compare alike, but other seeds read other text."""
    T = model.config.block_size
    n = (len(tokens) - 1) // T
    x = torch.from_numpy(tokens[:n * T].astype(np.int64)).view(n, T)  # (windows, T)
    y = torch.from_numpy(tokens[1:n * T + 1].astype(np.int64)).view(n, T)  # each window's next tokens
    sums = torch.zeros(1 + model.config.n_layer, device=device)  # [ce, MBE of each block], window-weighted
    with tqdm(total=n, unit="window", desc="val", leave=False) as bar:
        for first in range(0, n, batch_size):
            rows = slice(first, first + batch_size)
            _, ce, mbe_blocks = model(x[rows].to(device), y[rows].to(device))
            sums += torch.cat([ce.view(1), mbe_blocks]) * len(x[rows])
            bar.update(len(x[rows]))
    means = (sums / n).tolist()  # sync
    return dict(tokens=n * T, ce=means[0], mbe_all=sum(means[1:]) / len(means[1:]), mbe_blocks=means[1:])


def format_table(rows):
    """A Markdown table: readable in a terminal, and pasted as is into the README."""
    lines = ["| split | examples | exact match | answer CE | answer CE in context | end CE | length error | length bias "
             "| leading digit | leading 2 digits | last digit |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['split']} | {r['examples']} | {r['exact_match']:.3f} | {r['answer_ce']:.3f} | "
              f"{r.get('answer_ce_in_context', math.nan):.3f} | {r['end_ce']:.3f} | {r['length_error']:.3f} | "
              f"{r['length_bias']:+.3f} | {r['leading_digit_accuracy']:.3f} | {r['leading_two_digits_accuracy']:.3f} | "
              f"{r['last_digit_accuracy']:.3f} |" for r in rows]
    lines += ["", "exact match by operand digits:"]
    lines += [f"  {r['split']}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["exact_match_by_digits"].items())
              for r in rows]
    for end in ("first", "last"):
        lines += ["", f"answer CE per digit of the product, counted from the {end} digit (1, 2, ...):"]
        lines += [f"  {r['split']}: " + " ".join(f"{v:.3f}" for v in r[f"answer_ce_from_{end}"]) for r in rows]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Entry point
# -----------------------------------------------------------------------------
def writable_result(out_dir, name):
    """The path an evaluation writes its result to, checked before any scoring."""
    path = os.path.join(out_dir, name)
    if not os.access(out_dir, os.W_OK):
        stop(f"cannot write {path}: {out_dir} is not writable; copy the run to a folder you can write")
    return path


def write_result(path, argv, checkpoint, dataset, result):
    with open(path, "w") as f:
        json.dump(dict(command=shlex.join(["python", "sample.py", *argv]), iter_num=checkpoint["iter_num"],
                       dataset=dataset, **result), f, indent=2)
    print(f"wrote {path}")


def main(argv=None):
    """Prints samples (returns their text), the arithmetic table (returns its rows) or the validation
    CE and MBE (returns them)."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = load_sample_config(argv)
    gapt.set_threads(cfg.threads)
    device = gapt.check_device(cfg.device)
    prompt = read_prompt(cfg.start)
    model, checkpoint = load_model(cfg.out_dir, device)
    dataset = checkpoint["config"]["dataset"]
    data_dir = cfg.data_dir or checkpoint["config"]["data_dir"]
    meta_path = os.path.join(data_dir, dataset, "meta.json")
    meta = prepare_data.read_meta(data_dir, dataset)

    if cfg.eval == "arithmetic":
        checkpoint_path = os.path.join(cfg.out_dir, "ckpt.pt")
        result_path = writable_result(cfg.out_dir, "eval_arithmetic.json")
        answer_sets = load_arithmetic_splits(data_dir, dataset, meta, cfg.n, checkpoint_path)
        _, decode, eot_token = tokenizer_for(meta, model, meta_path)
        sizes = {split: len(examples) for split, (examples, _) in answer_sets.items()}
        print(f"{checkpoint_path} (iter {checkpoint['iter_num']}): greedy answers to the first "
              + ", ".join(f"{size} examples of {split}" for split, size in sizes.items()))
        short = [split for split, size in sizes.items() if size < cfg.n]
        if short:
            print(f"n={cfg.n} is capped: {', '.join(short)} hold fewer examples, and are scored whole")
        rows = [dict(split=split, **evaluate_arithmetic(model, examples, sep_token, eot_token, decode, device))
                for split, (examples, sep_token) in answer_sets.items()]
        print(format_table(rows))
        for row, (examples, _) in zip(rows, answer_sets.values()):
            if "answer_ce_in_context" not in row:
                print(f"{row['split']}: no answer CE in context: "
                      f"{why_no_answer_ce_in_context(examples, model.config.block_size)}")
        write_result(result_path, argv, checkpoint, dataset, dict(rows=rows))
        return rows

    if cfg.eval == "val":
        result_path = writable_result(cfg.out_dir, "eval_val.json")
        path = prepare_data.check_split(data_dir, dataset, "val", model.config.block_size, meta)
        print(f"{os.path.join(cfg.out_dir, 'ckpt.pt')} (iter {checkpoint['iter_num']}): CE and MBE over {path}")
        if device.type == "cpu":
            gapt.keep_freed_memory()  # each batch frees and allocates its logits again
        t0 = time.time()
        result = evaluate_split(model, np.fromfile(path, dtype=np.uint16), device)
        print(f"{result['tokens']:,} tokens: CE {result['ce']:.4f}, MBE of all blocks {result['mbe_all']:.4f} "
              f"(blocks {' '.join(f'{v:.4f}' for v in result['mbe_blocks'])}); {time.time() - t0:.0f} s")
        write_result(result_path, argv, checkpoint, dataset, result)
        return result

    encode, decode, eot_token = tokenizer_for(meta, model, meta_path)
    prompt_ids = encode(prompt) if prompt else [eot_token]  # a document or example starts after an end token
    if len(prompt_ids) > model.config.block_size:
        print(f"the prompt is {len(prompt_ids)} tokens; the model reads only the last {model.config.block_size}, "
              f"its block_size")
    if cfg.temperature == 0 and cfg.num_samples > 1:
        # greedy samples are all the same. A note, not an error: num_samples defaults to 3, and
        # --temperature=0 alone is how one asks for the model's most likely continuation
        print(f"temperature=0 decodes greedily, which gives one sample, not {cfg.num_samples}")
        cfg.num_samples = 1
    samples = [prompt + decode(ids) for ids in generate_samples(model, prompt_ids, cfg, eot_token, device)]
    for text in samples:
        print(text)
        print("---------------")
    return samples


if __name__ == "__main__":
    main()
