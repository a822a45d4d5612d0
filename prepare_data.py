"""
Prepare the datasets that gapt.py trains on. Everything reaches gapt.py through this script, as
nanoGPT-style files under <data_dir>/<dataset>/, the --data_dir and --dataset that gapt.py reads:

    train.bin, val.bin (and val_ood.bin, test_ood.bin for arithmetic)   headerless np.uint16 token ids
    meta.json                                              tokenizer, vocab size, eot id, counts, command

Three commands:

    python prepare_data.py fineweb --max_tokens=100000000              # FineWeb sample-10BT, streamed from the Hub
    python prepare_data.py text --files='books/*.txt' --dataset=books  # the same pipeline on local files
    python prepare_data.py arithmetic                                  # a*b=c lines, 1-3 digits (OOD val: 4-6)
    python prepare_data.py arithmetic --format=author                  # the same in the author's <bos>a x b = c<eos>

Options are written --key=value as in gapt.py (--key value works too), and each means one thing in
every command: --dataset is the output folder, --hf_config the Hub dataset's config.

Text is GPT-2 BPE (tiktoken). Each document becomes encode_ordinary(text) followed by ONE
end-of-text token (50256): eot *ends* a document, as "\\n" ends an arithmetic example, so a training
window that starts right after an eot starts at a document boundary, and a model sampled with
stop_token=eot stops where documents stop.

The arithmetic answers are also scored here, beside their format: the answer CE of each example
alone and in a stream of examples, the paper's OOD metric (gapt.py logs it, sample.py prints it).
"""

import argparse
import contextlib
import functools
import glob
import itertools
import json
import math
import multiprocessing
import os
import shlex
import sys
import time
import typing

import numpy as np
import tiktoken
from tqdm import tqdm


def stop(message):
    """The one way every program here fails (gapt.py, sample.py and experiments/ use it too): a non-zero
    exit with one line, prefixed by the program the user ran, naming the problem and the fix. Raised
    before or inside atomic_outputs, so no partial files."""
    raise SystemExit(f"{os.path.basename(sys.argv[0])}: {message}")


# ---- writing outputs: every file appears complete or not at all ----

@contextlib.contextmanager
def atomic_outputs(out_dir, filenames):
    """Yield {filename: open binary temp file}. If the block finishes, every temp file is renamed into
    place; if it fails or is interrupted, they are deleted. So gapt.py never trains on a truncated .bin,
    and re-running the same command simply replaces the old files. The folders it makes go too."""
    existing = nearest_existing(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    temp_paths = {name: os.path.join(out_dir, name + ".tmp") for name in filenames}
    files = {name: open(path, "wb") for name, path in temp_paths.items()}
    try:
        yield files
    except BaseException:
        for f in files.values():
            f.close()
        for path in temp_paths.values():
            os.remove(path)
        folder = os.path.abspath(out_dir)
        while folder != existing:
            os.rmdir(folder)
            folder = os.path.dirname(folder)
        raise
    for f in files.values():
        f.close()
    for name, path in temp_paths.items():  # meta.json is listed last, so it lands after the .bin files
        os.replace(path, os.path.join(out_dir, name))


def nearest_existing(path):
    """The absolute path, or the nearest folder above it that exists."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_out_dir(data_dir, dataset):
    """DATA_DIR/DATASET, once it is sure that atomic_outputs can write there."""
    if not data_dir:
        stop("--data_dir is empty; pass the folder that holds the datasets, such as --data_dir=data")
    if data_dir.startswith("~"):  # the shell leaves it as is after '=', and a folder named ~ is a trap
        stop(f"--data_dir={data_dir} starts with '~', which the shell does not expand in --key=value; "
             f"write the path out, such as --data_dir={os.path.expanduser(data_dir)}")
    if dataset in ("", ".", "..") or "/" in dataset or os.sep in dataset:
        stop(f"--dataset={dataset!r} is not a folder name; pass a name such as --dataset=books, "
             f"and the folder above it as --data_dir")
    out_dir = os.path.join(data_dir, dataset)
    existing = nearest_existing(out_dir)
    if not os.path.isdir(existing):
        option = "--dataset" if existing == os.path.abspath(out_dir) else "--data_dir"
        stop(f"{existing} is a file, not a folder, so {out_dir} cannot be made; choose another {option}")
    if not os.access(existing, os.W_OK | os.X_OK):
        stop(f"{existing} is read-only, so {out_dir} cannot be written; choose another --data_dir")
    return out_dir


def write_meta(f, tokenizer, vocab_size, eot_token, tokens, command):
    meta = {"tokenizer": tokenizer, "vocab_size": vocab_size, "eot_token": eot_token,
            "dtype": "uint16", "tokens": tokens, "command": command}
    f.write((json.dumps(meta, indent=2) + "\n").encode())


# ---- reading a dataset back: gapt.py and sample.py check it here, where the format is defined ----

def prepare_command(name, meta=None):
    """The command that makes (or made: meta.json keeps it) dataset `name`."""
    if meta and isinstance(meta.get("command"), str):
        return meta["command"]
    if name in ("fineweb", "arithmetic"):
        return f"python prepare_data.py {name}"
    return f"python prepare_data.py text --files='path/to/*.txt' --dataset={name}"


def read_meta(data_dir, name):
    """The dataset's meta.json (tokenizer, vocab_size, eot_token, tokens per split), or None."""
    path = os.path.join(data_dir, name, "meta.json")
    if not os.path.exists(path):
        return None
    fix = f"re-create it with: {prepare_command(name)}"
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        stop(f"{path} is not valid JSON ({e}); {fix}")
    expected = dict(vocab_size=int, eot_token=int, tokenizer=(str, list))
    wrong = [k for k, kind in expected.items() if not isinstance(meta, dict) or not isinstance(meta.get(k), kind)]
    if wrong:
        stop(f"{path} lacks or mistypes {', '.join(wrong)}; {fix}")
    return meta


def check_split(data_dir, name, split, block_size, meta):
    """The path of a split's .bin, or a one-line error with the command that fixes it: nothing trains
    on a missing or truncated file."""
    path = os.path.join(data_dir, name, f"{split}.bin")
    fix = f"prepare it with: {prepare_command(name, meta)}"
    if not os.path.exists(path):
        stop(f"dataset '{name}' has no {path}; {fix}")
    size = os.path.getsize(path)
    if size % 2:
        stop(f"{path} has an odd number of bytes, so it is not uint16 tokens; {fix}")
    n_tokens = size // 2
    expected = (meta or {}).get("tokens", {}).get(split)
    if expected is not None and expected != n_tokens:
        stop(f"{path} holds {n_tokens} tokens but meta.json says {expected} (interrupted write?); {fix}")
    if n_tokens <= block_size:
        stop(f"{path} has {n_tokens} tokens, fewer than block_size + 1 = {block_size + 1}; lower block_size or {fix}")
    return path


def split_examples(tokens, eot_token):
    """uint16 tokens -> list of examples, each a list of ids that starts and ends with eot_token.
    The leading eot is the previous example's end, as in every training window: without it the model
    reads `12*34=` at position 0 as it reads the start of a training window, where the first operand
    is most often cut (`...12*34=`), and scores far below what it has learned."""
    ends = np.flatnonzero(np.asarray(tokens) == eot_token)
    starts = np.concatenate(([0], ends[:-1] + 1))
    return [[eot_token] + tokens[s:e + 1].astype(np.int64).tolist() for s, e in zip(starts, ends)]


def answer_sets(data_dir, name, meta, n_examples):
    """Arithmetic data (a character vocabulary with '='): {split: (its first n_examples examples,
    the id of '=')} for val, val_ood and test_ood (when present), which gapt.py scores by answer CE;
    {} for text."""
    if meta is None or not isinstance(meta.get("tokenizer"), list) or "=" not in meta["tokenizer"]:
        return {}
    sep, sets = meta["tokenizer"].index("="), {}
    for split in ("val", "val_ood", "test_ood"):  # val_ood is the paper's headline metric: never skipped
        path = os.path.join(data_dir, name, f"{split}.bin")
        if split == "test_ood" and not os.path.exists(path):
            continue
        check_split(data_dir, name, split, 0, meta)  # missing, odd, or not the length meta.json says
        examples = split_examples(np.fromfile(path, dtype=np.uint16), meta["eot_token"])[:n_examples]
        # random bytes, or another dataset's file: examples without one '=' inside, or unknown ids
        if not examples or any(ex.count(sep) != 1 or not 1 < ex.index(sep) < len(ex) - 1
                               or max(ex) >= meta["vocab_size"] for ex in examples):
            stop(f"{path} does not hold a*b=c examples of this dataset's vocabulary; "
                 f"prepare it again with: {prepare_command(name, meta)}")
        sets[split] = (examples, sep)
    return sets


# ---- scoring answers, the paper's OOD metric: each example alone and in a stream of examples ----
# (gapt.py logs them at every evaluation, sample.py --eval=arithmetic prints them)

def answer_scores(model, examples, sep_token, digits, device, batch_size=256):
    """Teacher-forced CEs of the answers, each example its own prompt, in one read-back. answer_ce: over
    the tokens after sep_token '=' and before the final eot (in the author's format the space after '='
    too, as their code scores it); answer_ce_from_first / _from_last: per digit position of the product,
    counted from its leading / last digit, over the products that have it; end_ce: the final eot's CE."""
    import torch  # here, not at the top: preparing data never needs torch
    import torch.nn.functional as F
    with torch.no_grad():
        width = max(len(ex) for ex in examples)
        idx = torch.zeros(len(examples), width, dtype=torch.long)  # right padding: causal attention never looks at it
        # each scored target, as an index into the (N, width - 1) CEs flattened, and the bin it is averaged in:
        # 0 the answer, 1 the eot, 2k and 2k + 1 the k-th digit from the first and from the last
        targets, bins = [], []
        for row, ex in enumerate(examples):
            idx[row, :len(ex)] = torch.tensor(ex)
            eq, end = ex.index(sep_token), len(ex) - 2  # position t predicts ex[t + 1]: eq .. end - 1 the answer
            digit_at = [t for t in range(eq, end) if ex[t + 1] in digits]
            scored = ([(t, 0) for t in range(eq, end)] + [(end, 1)]
                      + [(t, 2 * k) for k, t in enumerate(digit_at, 1)]
                      + [(t, 2 * k + 1) for k, t in enumerate(reversed(digit_at), 1)])
            targets += [row * (width - 1) + t for t, _ in scored]
            bins += [b for _, b in scored]
        targets, bins = torch.tensor(targets), torch.tensor(bins)
        idx = idx.to(device)  # copied once: no copy inside the loop waits for the device
        ce = torch.empty(len(examples), width - 1, device=device)
        for i in range(0, len(examples), batch_size):
            x = idx[i:i + batch_size]
            logits = model.all_logits(x[:, :-1]).float()  # (B, width - 1, vocab)
            ce[i:i + batch_size] = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        ce = ce.flatten().cpu().double()  # the one read-back; summed on the host, in the same order every time
        counts = bins.bincount()
        means = (torch.zeros(len(counts), dtype=torch.float64).index_add_(0, bins, ce[targets]) / counts).tolist()
        return dict(answer_ce=means[0], answer_ce_from_first=means[2::2], answer_ce_from_last=means[3::2],
                    end_ce=means[1])


def answer_ce_in_context(model, examples, sep_token, device, window, batch_size=64):
    """The answer CE with the examples read as one stream, in order, as in training: windows of
    `window` tokens every window // 2 tokens, each example scored in the one window where it ends in
    the second half and lies whole, so every scored answer sees at least half a window of earlier
    examples and their answers. The examples that end in the stream's first half-window are context only.
    NaN when the longest example is longer than half a window, or the examples fill less than one window."""
    import torch  # here, not at the top: preparing data never needs torch
    import torch.nn.functional as F
    with torch.no_grad():
        half, eot = window // 2, examples[0][0]
        stream = torch.tensor([eot] + [t for ex in examples for t in ex[1:]])  # eot a*b=c eot a*b=c eot ...
        if max(len(ex) - 1 for ex in examples) > half or len(stream) <= window:
            return math.nan
        ids = torch.arange(len(stream))
        last = lambda mask: torch.cummax(torch.where(mask, ids, -1), 0).values  # latest index at or before each token
        # answer digits: after the '=' of their own example (the last '=' comes after the last eot)
        is_answer = (stream != eot) & (stream != sep_token) & (last(stream == sep_token) > last(stream == eot))
        eots = ids[stream == eot]
        example_end = eots[torch.searchsorted(eots, ids)]  # the eot that ends each token's example
        starts = torch.arange(0, len(stream) - window, half)[:, None]  # (n_windows, 1)
        targets = starts + 1 + torch.arange(window)  # (n_windows, window): the positions each window predicts
        end = example_end[targets]
        # an example no longer than half a window that ends in the second half lies whole in the window
        scored = is_answer[targets] & (end > starts + half) & (end <= starts + 2 * half)
        total, count = 0.0, 0
        for rows in torch.arange(len(starts)).split(batch_size):
            logits = model.all_logits(stream[targets[rows] - 1].to(device)).float()  # (B, window, vocab)
            nll = F.cross_entropy(logits.transpose(1, 2), stream[targets[rows]].to(device), reduction="none")
            total += nll[scored[rows].to(device)].sum().item()
            count += int(scored[rows].sum())
        return total / count if count else math.nan


# ---- text sources: the Hub (fineweb) or local files (text), both as a streaming `datasets` object ----

LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def open_hub_dataset(hf_id, config):
    """Stream the dataset, so --max_tokens reads only what it needs and disk holds only the .bin files."""
    from datasets import load_dataset  # here, not at the top: gapt.py imports this file to check data,
    from huggingface_hub import HfApi  # and `datasets` alone takes a second to import
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError
    how_to_go_offline = ("To prepare offline, get the parquet files onto this machine and run: "
                         "python prepare_data.py text --files='DIR/*.parquet' --dataset=fineweb")
    # One quick request first: with no network huggingface_hub retries for ~25 s before datasets
    # gives up, and a misspelled --hf_id deserves its own message.
    try:
        HfApi().dataset_info(hf_id, timeout=10)
    except HFValidationError as e:  # raised before any request, so it is no network problem
        stop(f"--hf_id={hf_id!r} is not a Hub dataset id ({e}). Pass one such as --hf_id=HuggingFaceFW/fineweb")
    except RepositoryNotFoundError:
        stop(f"no dataset {hf_id!r} on the Hugging Face Hub, or no access to it. Check --hf_id")
    except Exception as e:  # offline mode, DNS, refused, timeout: any of them means we cannot stream
        stop(f"cannot reach {hf_id!r} on the Hugging Face Hub ({e!r}). {how_to_go_offline}")
    try:
        return readable_rows(load_dataset(hf_id, name=config, split="train", streaming=True))
    except ConnectionError as e:
        stop(f"cannot reach {hf_id!r} on the Hugging Face Hub ({e}). {how_to_go_offline}")
    except ValueError as e:  # e.g. an unknown config; datasets lists the available ones
        stop(f"{e}. Check --hf_config")


def open_local_dataset(patterns, sample_by):
    """The same streaming reader as the Hub path, so tests on small local files exercise it."""
    from datasets import load_dataset, logging as datasets_logging
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True))  # sorted: glob order is not stable
        if not matches:
            stop(f"no files match {pattern!r}. Check the path or glob in --files")
        folders = [m for m in matches if os.path.isdir(m)]
        if folders:
            stop(f"--files got the folder {folders[0]!r}; pass files or a glob, such as '{folders[0]}/*.txt'")
        unreadable = [m for m in matches if not os.access(m, os.R_OK)]  # glob also matches a dangling link
        if unreadable:
            stop(f"cannot read {unreadable[0]!r} (a link to nothing, or no read permission). Check --files")
        files += matches
    # A file matched twice (by two globs, or by a glob and its path) is read once: twice would put
    # its documents in both val and train.
    files = list({os.path.realpath(f): f for f in files}.values())
    extensions = {os.path.splitext(f)[1] for f in files}
    if len(extensions) > 1 or not extensions <= LOCAL_BUILDERS.keys():
        stop(f"--files gives {sorted(extensions)} files. Pass files of one type: {', '.join(LOCAL_BUILDERS)}")
    builder = LOCAL_BUILDERS[extensions.pop()]
    if builder == "parquet":  # datasets fails on a file without rows, and on a damaged one without naming it
        import pyarrow.parquet as pq
        rows = {}
        for path in files:
            try:
                rows[path] = pq.read_metadata(path).num_rows
            except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
                stop(f"{path} is not a parquet file ({e}). Check --files")
        files = [path for path in files if rows[path]]
        if not files:
            stop("every parquet file in --files is empty. Check --files")
    # Our one-line errors name the file and line; datasets would log a second line about the same error.
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)
    # The text builder would make every line a document; sample_by says what a document is instead.
    options = {"sample_by": sample_by} if builder == "text" else {}
    ds = load_dataset(builder, data_files=files, split="train", streaming=True, **options)
    return readable_rows(ds, files if builder != "parquet" else ())  # parquet is binary: no lines to point at


class InputError(Exception):
    """The input cannot be read. An Exception, not SystemExit: the pool's feeder thread reads the input,
    and only an Exception comes back through pool.imap to the main thread, where main() reports it."""


def readable_rows(ds, text_files=()):
    """ds's rows; a read error becomes an InputError that names the file and line when ds reads text_files."""
    try:
        yield from ds
    except (UnicodeDecodeError, ValueError, OSError) as e:  # pyarrow's parse errors are ValueErrors
        raise InputError(first_bad_line(text_files) or f"cannot read the input ({type(e).__name__}: "
                         f"{str(e)[:200]}). Check --files, or for fineweb the connection") from None


def first_bad_line(text_files):
    """Where reading failed, as the one-line error that names the file, line and fix; None if no line
    is at fault. Called only after a failure: it reads the files again, up to that line."""
    for path in text_files:
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):  # a UTF-8 character never spans a newline
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    return (f"{path} line {number} is not UTF-8 ({e.reason}), and text files must be UTF-8. Convert "
                            f"it, e.g. iconv -f latin1 -t utf-8 {shlex.quote(path)} > utf8-{os.path.basename(path)}")
                if path.endswith(".jsonl") and text.strip():
                    try:
                        row = json.loads(text)
                    except json.JSONDecodeError:
                        row = None
                    if not isinstance(row, dict):
                        return (f"{path} line {number} is not a JSON object. Fix that line: every .jsonl line "
                                f"one JSON object, such as {{\"text\": \"...\"}}")
    return None


def row_text(row, column, number):
    """The row's text; None (a missing value) reads as an empty document."""
    text = row[column]
    if text is not None and not isinstance(text, str):
        raise InputError(f"row {number} of the input holds {type(text).__name__} in column {column!r}, not "
                         f"text. Pass the text column as --text_column, or fix that row")
    return text


def document_texts(rows, column):
    """Check the first row before anything is written, then yield the text of every non-empty document
    (an empty or null one would only add a lone eot); a row whose text is not a string ends the run."""
    first = next(rows, None)
    if first is None:
        stop("the input has no rows. Check --files")
    if column not in first:
        stop(f"no column {column!r} in the input; its columns are {sorted(first)}. Pass --text_column")
    row_text(first, column, 1)
    rows = itertools.chain([first], rows)
    return (text for number, row in enumerate(rows, 1) if (text := row_text(row, column, number)))


# ---- tokenization: GPT-2 BPE in worker processes, tokens appended to the .bin files as they come ----

DOCS_PER_TASK = 256  # documents sent to a worker at once: fewer, larger messages between processes


@functools.cache
def tokenizer():
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken downloads its BPE files on first use
        stop(f"cannot load the GPT-2 BPE files ({type(e).__name__}); tiktoken downloads them on first use. "
             f"Offline, set TIKTOKEN_CACHE_DIR to a folder that holds them")


def encode_document(text):
    """Runs in a worker. encode_ordinary reads a literal "<|endoftext|>" in the text as plain text, so
    token 50256 only ever marks our document ends. Returns bytes, which travel back to the parent
    process much faster than arrays and go straight into the file."""
    enc = tokenizer()  # created on first use, so it works whether workers are forked or spawned
    return np.array(enc.encode_ordinary(text) + [enc.eot_token], dtype=np.uint16).tobytes()


def check_text_args(args):
    """Everything that can be checked before touching the network or the disk."""
    if args.max_tokens is not None and args.max_tokens < args.val_tokens:
        stop(f"--max_tokens={args.max_tokens} is smaller than the validation slice --val_tokens="
             f"{args.val_tokens}. Raise --max_tokens or lower --val_tokens")
    if tokenizer().n_vocab > 2**16:
        stop(f"the tokenizer has {tokenizer().n_vocab} tokens; ids above 65535 do not fit the uint16 "
             f".bin format. Use a tokenizer with at most 65536 tokens")


def prepare_text(texts, args, out_dir, command):
    """Documents are dealt in stream order: document i goes to val if i % val_every == 0, until val
    holds val_tokens tokens; all others go to train. It needs no look-ahead, so it works on a stream,
    and it is deterministic. The document that reaches --max_tokens is cut there."""
    enc = tokenizer()
    limit = args.max_tokens or sys.maxsize
    counts = {"train": 0, "val": 0}
    documents = 0
    start = time.time()
    with multiprocessing.Pool(args.num_proc) as pool, \
            atomic_outputs(out_dir, ["train.bin", "val.bin", "meta.json"]) as out, \
            tqdm(total=args.max_tokens, unit="tok", unit_scale=True, desc=f"tokenizing to {out_dir}") as bar:
        for tokens in pool.imap(encode_document, texts, chunksize=DOCS_PER_TASK):
            split = "val" if documents % args.val_every == 0 and counts["val"] < args.val_tokens else "train"
            tokens = tokens[:2 * (limit - counts["train"] - counts["val"])]  # 2 bytes per token
            out[f"{split}.bin"].write(tokens)
            counts[split] += len(tokens) // 2
            bar.update(len(tokens) // 2)
            documents += 1
            if counts["train"] + counts["val"] == limit:
                break
        if documents == 0:
            stop("every document in the input is empty. Check --files and --text_column")
        if counts["train"] == 0:
            if documents > 1:  # with --val_every 1, val takes every document until it holds --val_tokens
                before_last = counts["val"] - len(tokens) // 2  # so the last document would have gone to train
                fix = f"Raise --val_every, or lower --val_tokens to {before_last} or less, to leave train documents"
            elif counts["val"] == limit:
                fix = "Raise --max_tokens: the first document used it up"
            else:
                fix = "Give more documents (for a .txt file, --sample_by=paragraph or line splits it into more)"
            stop(f"the train split is empty: every document read ({documents:,}) went to val. {fix}")
        write_meta(out["meta.json"], "gpt2", enc.n_vocab, enc.eot_token, counts, command)
    seconds = time.time() - start
    total = counts["train"] + counts["val"]
    print(f"wrote {out_dir}: {counts['train']:,} train + {counts['val']:,} val tokens from {documents:,} "
          f"documents in {seconds:.1f} s ({total / seconds:,.0f} tokens/s, {args.num_proc} processes)")


# ---- arithmetic: a*b=c examples over a character vocabulary, in our format or the author's ----

class ArithmeticFormat(typing.NamedTuple):
    """What differs between our data and the author's; the digit ranges, the seeds and the files do not."""
    tokens: list  # meta.json's tokenizer: token id = index
    example: str  # one example written in tokens, with the operands {a}, {b} and the product {c}
    end: str  # the token that ends every example: the eot token that split_examples cuts at
    lowest_one_digit: int  # the smallest one-digit operand
    held_out: bool  # whether train avoids every val and val_ood pair


ARITHMETIC_FORMATS = {
    # "\n" ends every example; 0 is one of the ten one-digit numbers; train never shows a held-out pair.
    "ours": ArithmeticFormat(list("0123456789*=\n"), "{a}*{b}={c}\n", "\n", 0, True),
    # The author's data/arithmetic.py (fangyuan-ksgk/mod_gpt): their DigitTokenizer's ids, a digit count
    # d drawn per operand and the operand from 10^(d-1) .. 10^d - 1 (so 1-9 for one digit), every
    # split drawn independently (their ID validation pairs also occur in train).
    "author": ArithmeticFormat(["<bos>", "<eos>", "x", "=", " ", *"0123456789"], "<bos>{a} x {b} = {c}<eos>",
                               "<eos>", 1, False),
}
# Operand digit counts per split, the same in both formats. Held-out splits come first: in our format
# each split avoids every example of the splits before it, so neither val nor val_ood shares an
# example with train. test_ood, a second OOD draw written last (so the other files do not change),
# is for measuring the author's leak, choosing steps on an OOD *test* loss, without touching val_ood.
SPLIT_DIGITS = {"val": (1, 3), "val_ood": (4, 6), "train": (1, 3), "test_ood": (4, 6)}
EXAMPLES_PER_CHUNK = 100_000  # encoded at once: memory stays small at any --n_train (the author used 10M)
# In our format train redraws every pair that val holds, so a large val leaves train little to draw: after
# 1M val draws 15% of the 1-3 digit pairs' probability is left, after 10M 3% (many minutes of redrawing),
# after 100M next to none (it would redraw for ever).
MAX_HELD_OUT_N_VAL = 1_000_000


def sample_operands(rng, n, digits, lowest_one_digit):
    """Digit count uniform over the range, then the number uniform among the numbers written with that
    many digits: lowest_one_digit-9 for one digit (0 is a one-digit number in ours, not in the
    author's), 10^(d-1) .. 10^d - 1 above."""
    d = rng.integers(digits[0], digits[1] + 1, size=n)
    return rng.integers(np.where(d == 1, lowest_one_digit, 10 ** (d - 1)), 10**d)


def pair_key(a, b):
    return a * 10**6 + b  # one integer per (a, b), unique for operands of up to 6 digits


def sample_pairs(rng, n, digits, exclude, lowest_one_digit):
    """n operand pairs from the paper's distribution, redrawing any pair whose key is in exclude."""
    a, b = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    while len(a) < n:
        new_a = sample_operands(rng, n - len(a), digits, lowest_one_digit)
        new_b = sample_operands(rng, n - len(a), digits, lowest_one_digit)
        keep = ~np.isin(pair_key(new_a, new_b), exclude)
        a, b = np.concatenate([a, new_a[keep]]), np.concatenate([b, new_b[keep]])
    return a, b


def example_encoder(fmt):
    """(the example template with one character per token, a table from that character's code to the
    token id), so that a whole chunk of examples encodes by one lookup. A one-character token stands
    for itself, a longer one (the author's <bos>, <eos>) for the control character numbered by its id."""
    template, ids = fmt.example, np.zeros(128, dtype=np.uint16)
    for i, token in enumerate(fmt.tokens):
        symbol = token if len(token) == 1 else chr(i)
        template = template.replace(token, symbol)
        ids[ord(symbol)] = i
    return template, ids


def write_examples(f, a, b, split, fmt):
    """Python ints for the product: exact at any size, and 1M examples format in about a second.
    Returns the number of tokens written."""
    template, ids = example_encoder(fmt)
    n_tokens = 0
    with tqdm(total=len(a), unit="ex", desc=f"writing {split}") as bar:
        for start in range(0, len(a), EXAMPLES_PER_CHUNK):
            chunk = slice(start, start + EXAMPLES_PER_CHUNK)
            pairs = zip(a[chunk].tolist(), b[chunk].tolist())
            text = "".join(template.format(a=x, b=y, c=x * y) for x, y in pairs)
            tokens = ids[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]
            f.write(tokens.tobytes())
            n_tokens += len(tokens)
            bar.update(len(a[chunk]))
    return n_tokens


def prepare_arithmetic(args, out_dir, command):
    fmt = ARITHMETIC_FORMATS[args.format]
    if fmt.held_out and args.n_val > MAX_HELD_OUT_N_VAL:
        stop(f"--n_val={args.n_val} leaves train almost no 1-3 digit pairs, since train avoids every val pair. "
             f"Use --n_val={MAX_HELD_OUT_N_VAL} or less, or --format=author, which keeps val pairs in train")
    sizes = {"val": args.n_val, "val_ood": args.n_val, "train": args.n_train, "test_ood": args.n_val}
    counts = {}
    seen = np.empty(0, dtype=np.int64)
    with atomic_outputs(out_dir, [f"{split}.bin" for split in SPLIT_DIGITS] + ["meta.json"]) as out:
        for i, (split, digits) in enumerate(SPLIT_DIGITS.items()):
            # One random stream per split: val stays the same when --n_train changes.
            rng = np.random.default_rng([args.seed, i])
            a, b = sample_pairs(rng, sizes[split], digits, seen, fmt.lowest_one_digit)
            if fmt.held_out:
                seen = np.concatenate([seen, pair_key(a, b)])
            counts[split] = write_examples(out[f"{split}.bin"], a, b, split, fmt)
        write_meta(out["meta.json"], fmt.tokens, len(fmt.tokens), fmt.tokens.index(fmt.end), counts, command)
    print(f"wrote {out_dir}: " + ", ".join(f"{n:,} {split} tokens" for split, n in counts.items()))


# ---- command line ----

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show every default, and keep the docstring's layout."""


def whole_number(low):
    """An argparse type: an int of at least low."""
    def parse(s):
        try:
            n = int(s)
        except ValueError:
            n = None
        if n is None or n < low:
            raise argparse.ArgumentTypeError(f"must be a whole number of at least {low}, got {s!r}")
        return n
    return parse


class Renamed(argparse.Action):
    """An option's old spelling, hidden from --help: it fails, naming the new one, where argparse would
    only say 'unrecognized arguments'."""

    def __init__(self, option_strings, dest, new):
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now {self.new}")


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data_dir", default="data", help="root folder; files go to DATA_DIR/DATASET/")
    text = argparse.ArgumentParser(add_help=False)
    text.add_argument("--text_column", default="text", help="column holding the document text")
    text.add_argument("--max_tokens", type=whole_number(1), default=None,
                      help="stop after this many tokens, val + train; by default, read the whole input")
    text.add_argument("--val_tokens", type=whole_number(1), default=10_000_000,
                      help="tokens of the validation slice (fewer if the input runs out)")
    text.add_argument("--val_every", type=whole_number(1), default=10,
                      help="every VAL_EVERY-th document goes to val until it holds VAL_TOKENS")
    text.add_argument("--num_proc", type=whole_number(1), default=os.cpu_count(),
                      help="tokenizer worker processes; the default is this machine's core count")

    # allow_abbrev=False: an option is its whole key, as in gapt.py, so --data is no guess at --data_dir
    style = dict(formatter_class=HelpFormatter, allow_abbrev=False)
    dataset_help = "output folder under DATA_DIR: gapt.py's --dataset"
    parser = argparse.ArgumentParser(prog="prepare_data.py", description=__doc__, **style)
    commands = parser.add_subparsers(dest="command", required=True)
    fineweb = commands.add_parser("fineweb", parents=[text, common], **style,
                                  help="stream a Hub dataset (FineWeb, FineWeb-Edu), tokenize it with GPT-2 BPE")
    fineweb.add_argument("--hf_id", default="HuggingFaceFW/fineweb", help="Hub dataset id")
    fineweb.add_argument("--hf_config", default="sample-10BT", help="Hub dataset config")
    fineweb.add_argument("--dataset", default="fineweb", help=dataset_help)
    fineweb.add_argument("--name", action=Renamed, new="--hf_config (the Hub config; the output folder is --dataset)")
    local = commands.add_parser("text", parents=[text, common], **style,
                                help="the same pipeline on local .txt, .jsonl or .parquet files")
    # required options have no default to show; "extend": --files=a.txt --files=b.txt reads both
    local.add_argument("--files", nargs="+", action="extend", required=True, default=argparse.SUPPRESS,
                       help="file paths or quoted globs ('**' recurses)")
    local.add_argument("--dataset", required=True, default=argparse.SUPPRESS, help=dataset_help)
    local.add_argument("--name", action=Renamed, new="--dataset")
    local.add_argument("--sample_by", choices=["paragraph", "document", "line"], default="paragraph",
                       help=".txt only: a document is a paragraph (text between blank lines), a file, or a line")
    arithmetic = commands.add_parser("arithmetic", parents=[common], **style,
                                     help="a*b=c examples: train and val 1-3 digit operands, val_ood and test_ood 4-6")
    arithmetic.add_argument("--n_train", type=whole_number(1), default=1_000_000,
                            help="training examples (the author used 10,000,000)")
    arithmetic.add_argument("--n_val", type=whole_number(1), default=10_000,
                            help="examples in val, and again in val_ood and test_ood (the author used 10,000); at "
                                 f"most {MAX_HELD_OUT_N_VAL:,} in our format, as train avoids every val pair")
    arithmetic.add_argument("--format", choices=ARITHMETIC_FORMATS, default="ours",
                            help="ours: `a*b=c\\n`, one-digit operands 0-9, no val or val_ood pair in train; "
                                 "author: `<bos>a x b = c<eos>` and the ids of the author's data/arithmetic.py, "
                                 "one-digit operands 1-9, every split drawn independently (val pairs recur in "
                                 "train). Another --dataset keeps both")
    arithmetic.add_argument("--seed", type=whole_number(0), default=0, help="random seed; same seed, same files")
    arithmetic.add_argument("--dataset", default="arithmetic", help=dataset_help)
    # `prepare_data.py --help` shows every command's options, not just the command names.
    parser.epilog = "\n".join(p.format_help() for p in commands.choices.values())
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "prepare_data.py", *argv])
    out_dir = check_out_dir(args.data_dir, args.dataset)
    if args.command == "arithmetic":
        prepare_arithmetic(args, out_dir, command)
        return
    check_text_args(args)
    if args.command == "fineweb":
        rows = open_hub_dataset(args.hf_id, args.hf_config)
    else:
        rows = open_local_dataset(args.files, args.sample_by)
    try:
        prepare_text(document_texts(rows, args.text_column), args, out_dir, command)
    except InputError as e:  # raised before or inside atomic_outputs: no partial files either way
        stop(str(e))


if __name__ == "__main__":  # the guard lets worker processes import this file where they are spawned
    main()
