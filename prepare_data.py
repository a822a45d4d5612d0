"""
Prepare the datasets that gapt.py trains on. Everything reaches gapt.py through this script, as
nanoGPT-style files under <data_dir>/<name>/:

    train.bin, val.bin (and val_ood.bin, test_ood.bin for arithmetic)   headerless np.uint16 token ids
    meta.json                                              tokenizer, vocab size, eot id, counts, command

Three commands:

    python prepare_data.py fineweb --max_tokens 100000000      # FineWeb sample-10BT, streamed from the Hub
    python prepare_data.py text --files 'books/*.txt' --name books   # the same pipeline on local files
    python prepare_data.py arithmetic                            # a*b=c lines, 1-3 digits (OOD val: 4-6)
    python prepare_data.py arithmetic --format author            # the same in the author's <bos>a x b = c<eos>

Text is GPT-2 BPE (tiktoken). Each document becomes encode_ordinary(text) followed by ONE
end-of-text token (50256): eot *ends* a document, as "\\n" ends an arithmetic example, so a training
window that starts right after an eot starts at a document boundary, and a model sampled with
stop_token=eot stops where documents stop.
"""

import argparse
import contextlib
import functools
import glob
import itertools
import json
import multiprocessing
import os
import shlex
import sys
import time
import typing

import numpy as np
import tiktoken
from tqdm import tqdm


def fail(message):
    """One-line error and a non-zero exit; raised before or inside atomic_outputs, so no partial files."""
    raise SystemExit(f"prepare_data.py: {message}")


# ---- writing outputs: every file appears complete or not at all ----

@contextlib.contextmanager
def atomic_outputs(out_dir, filenames):
    """Yield {filename: open binary temp file}. If the block finishes, every temp file is renamed into
    place; if it fails or is interrupted, they are deleted. So gapt.py never trains on a truncated .bin,
    and re-running the same command simply replaces the old files."""
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
        raise
    for f in files.values():
        f.close()
    for name, path in temp_paths.items():  # meta.json is listed last, so it lands after the .bin files
        os.replace(path, os.path.join(out_dir, name))


def write_meta(f, tokenizer, vocab_size, eot_token, tokens, command):
    meta = {"tokenizer": tokenizer, "vocab_size": vocab_size, "eot_token": eot_token,
            "dtype": "uint16", "tokens": tokens, "command": command}
    f.write((json.dumps(meta, indent=2) + "\n").encode())


# ---- reading a dataset back: gapt.py and sample.py check it here, where the format is defined ----

def stop(message):
    """A one-line error from whichever program is checking the data (gapt.py, sample.py)."""
    raise SystemExit(f"{os.path.basename(sys.argv[0])}: {message}")


def prepare_command(name):
    if name in ("fineweb", "arithmetic"):
        return f"python prepare_data.py {name}"
    return f"python prepare_data.py text --files 'path/to/*.txt' --name {name}"


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
    fix = f"prepare it with: {prepare_command(name)}"
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
    sets = {}
    for split in ("val", "val_ood", "test_ood"):
        path = os.path.join(data_dir, name, f"{split}.bin")
        if os.path.exists(path):
            examples = split_examples(np.fromfile(path, dtype=np.uint16), meta["eot_token"])
            sets[split] = (examples[:n_examples], meta["tokenizer"].index("="))
    return sets


# ---- text sources: the Hub (fineweb) or local files (text), both as a streaming `datasets` object ----

LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def open_hub_dataset(hf_id, config):
    """Stream the dataset, so --max_tokens reads only what it needs and disk holds only the .bin files."""
    from datasets import load_dataset  # here, not at the top: gapt.py imports this file to check data,
    from huggingface_hub import HfApi  # and `datasets` alone takes a second to import
    from huggingface_hub.errors import RepositoryNotFoundError
    how_to_go_offline = ("To prepare offline, get the parquet files onto this machine and run: "
                         "python prepare_data.py text --files 'DIR/*.parquet' --name fineweb")
    # One quick request first: with no network huggingface_hub retries for ~25 s before datasets
    # gives up, and a misspelled --hf_id deserves its own message.
    try:
        HfApi().dataset_info(hf_id, timeout=10)
    except RepositoryNotFoundError:
        fail(f"no dataset {hf_id!r} on the Hugging Face Hub, or no access to it. Check --hf_id")
    except Exception as e:  # offline mode, DNS, refused, timeout: any of them means we cannot stream
        fail(f"cannot reach {hf_id!r} on the Hugging Face Hub ({e!r}). {how_to_go_offline}")
    try:
        return load_dataset(hf_id, name=config, split="train", streaming=True)
    except ConnectionError as e:
        fail(f"cannot reach {hf_id!r} on the Hugging Face Hub ({e}). {how_to_go_offline}")
    except ValueError as e:  # e.g. an unknown config; datasets lists the available ones
        fail(f"{e}. Check --name")


def open_local_dataset(patterns, sample_by):
    """The same streaming reader as the Hub path, so tests on small local files exercise it."""
    from datasets import load_dataset
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True))  # sorted: glob order is not stable
        if not matches:
            fail(f"no files match {pattern!r}. Check the path or glob in --files")
        folders = [m for m in matches if os.path.isdir(m)]
        if folders:
            fail(f"--files got the folder {folders[0]!r}; pass files or a glob, such as '{folders[0]}/*.txt'")
        files += matches
    extensions = {os.path.splitext(f)[1] for f in files}
    if len(extensions) > 1 or not extensions <= LOCAL_BUILDERS.keys():
        fail(f"--files gives {sorted(extensions)} files. Pass files of one type: {', '.join(LOCAL_BUILDERS)}")
    builder = LOCAL_BUILDERS[extensions.pop()]
    # The text builder would make every line a document; sample_by says what a document is instead.
    options = {"sample_by": sample_by} if builder == "text" else {}
    return load_dataset(builder, data_files=files, split="train", streaming=True, **options)


class InputError(Exception):
    """The input cannot be read. An Exception, not SystemExit: the pool's feeder thread reads the input,
    and only an Exception comes back through pool.imap to the main thread, where main() reports it."""


def readable_rows(ds):
    try:
        yield from ds
    except (UnicodeDecodeError, ValueError, OSError) as e:  # pyarrow's parse errors are ValueErrors
        raise InputError(f"cannot read the input ({type(e).__name__}: {str(e)[:200]}). Text files must be "
                         f"UTF-8 (convert with: iconv -f latin1 -t utf-8 in.txt > out.txt), and every .jsonl "
                         f"line one JSON object") from None


def document_texts(ds, column):
    """Check the first row before anything is written, then yield the text of every non-empty document
    (an empty one would only add a lone eot)."""
    rows = readable_rows(ds)
    first = next(rows, None)
    if first is None:
        fail("the input has no rows. Check --files")
    if column not in first:
        fail(f"no column {column!r} in the input; its columns are {sorted(first)}. Pass --text_column")
    if not isinstance(first[column], str):
        fail(f"column {column!r} holds {type(first[column]).__name__}, not text. Pass --text_column")
    return (row[column] for row in itertools.chain([first], rows) if row[column])


# ---- tokenization: GPT-2 BPE in worker processes, tokens appended to the .bin files as they come ----

DOCS_PER_TASK = 256  # documents sent to a worker at once: fewer, larger messages between processes


@functools.cache
def tokenizer():
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken downloads its BPE files on first use
        fail(f"cannot load the GPT-2 BPE files ({type(e).__name__}); tiktoken downloads them on first use. "
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
        fail(f"--max_tokens {args.max_tokens} is smaller than the validation slice --val_tokens "
             f"{args.val_tokens}. Raise --max_tokens or lower --val_tokens")
    if tokenizer().n_vocab > 2**16:
        fail(f"the tokenizer has {tokenizer().n_vocab} tokens; ids above 65535 do not fit the uint16 "
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
        if counts["train"] == 0:
            fail(f"the train split is empty ({documents} documents, all in val). Give more documents "
                 f"(for .txt files, --sample_by paragraph) or raise --max_tokens")
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


def positive_int(s):
    if int(s) < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {s}")
    return int(s)


def non_negative_int(s):
    if int(s) < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {s}")
    return int(s)


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data_dir", default="data", help="root folder; files go to DATA_DIR/<name>/")
    text = argparse.ArgumentParser(add_help=False)
    text.add_argument("--text_column", default="text", help="column holding the document text")
    text.add_argument("--max_tokens", type=positive_int, default=None,
                      help="stop after this many tokens, val + train; None reads the whole input")
    text.add_argument("--val_tokens", type=positive_int, default=10_000_000,
                      help="tokens of the validation slice (fewer if the input runs out)")
    text.add_argument("--val_every", type=positive_int, default=10,
                      help="every VAL_EVERY-th document goes to val until it holds VAL_TOKENS")
    text.add_argument("--num_proc", type=positive_int, default=os.cpu_count(),
                      help="tokenizer worker processes; the default is this machine's core count")

    parser = argparse.ArgumentParser(prog="prepare_data.py", description=__doc__,
                                     formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fineweb = commands.add_parser("fineweb", parents=[text, common], formatter_class=HelpFormatter,
                                  help="stream a Hub dataset (FineWeb, FineWeb-Edu), tokenize it with GPT-2 BPE")
    fineweb.add_argument("--hf_id", default="HuggingFaceFW/fineweb", help="Hub dataset id")
    fineweb.add_argument("--name", dest="config", metavar="NAME", default="sample-10BT",
                         help="Hub dataset config")
    fineweb.add_argument("--dataset", dest="out_name", metavar="NAME", default="fineweb",
                         help="output folder name under DATA_DIR")
    local = commands.add_parser("text", parents=[text, common], formatter_class=HelpFormatter,
                                help="the same pipeline on local .txt, .jsonl or .parquet files")
    # required options have no default to show
    local.add_argument("--files", nargs="+", required=True, default=argparse.SUPPRESS,
                       help="file paths or quoted globs ('**' recurses)")
    local.add_argument("--name", dest="out_name", metavar="NAME", required=True, default=argparse.SUPPRESS,
                       help="output folder name under DATA_DIR")
    local.add_argument("--sample_by", choices=["paragraph", "document", "line"], default="paragraph",
                       help=".txt only: a document is a paragraph (text between blank lines), a file, or a line")
    arithmetic = commands.add_parser("arithmetic", parents=[common], formatter_class=HelpFormatter,
                                     help="a*b=c examples: train and val 1-3 digit operands, val_ood and test_ood 4-6")
    arithmetic.add_argument("--n_train", type=positive_int, default=1_000_000,
                            help="training examples (the author used 10,000,000)")
    arithmetic.add_argument("--n_val", type=positive_int, default=10_000,
                            help="examples in val, and again in val_ood and test_ood (the author used 10,000)")
    arithmetic.add_argument("--format", choices=ARITHMETIC_FORMATS, default="ours",
                            help="ours: `a*b=c\\n`, one-digit operands 0-9, no val or val_ood pair in train; "
                                 "author: `<bos>a x b = c<eos>` and the ids of the author's data/arithmetic.py, "
                                 "one-digit operands 1-9, every split drawn independently (val pairs recur in "
                                 "train). Another --data_dir keeps both")
    arithmetic.add_argument("--seed", type=non_negative_int, default=0, help="random seed; same seed, same files")
    arithmetic.set_defaults(out_name="arithmetic")
    # `prepare_data.py --help` shows every command's options, not just the command names.
    parser.epilog = "\n".join(p.format_help() for p in commands.choices.values())
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "prepare_data.py", *argv])
    out_dir = os.path.join(args.data_dir, args.out_name)
    if args.command == "arithmetic":
        prepare_arithmetic(args, out_dir, command)
        return
    check_text_args(args)
    if args.command == "fineweb":
        ds = open_hub_dataset(args.hf_id, args.config)
    else:
        ds = open_local_dataset(args.files, args.sample_by)
    try:
        prepare_text(document_texts(ds, args.text_column), args, out_dir, command)
    except InputError as e:  # raised before or inside atomic_outputs: no partial files either way
        fail(str(e))


if __name__ == "__main__":  # the guard lets worker processes import this file where they are spawned
    main()
