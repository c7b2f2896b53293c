"""``conure-dist prepare ttl|movielens|synthetic``: raw data -> the prepared-dataset format.

Bad input stops the command with ``file:line: reason`` and exit status 1, unless
``--skip-bad`` is given, in which case such rows are skipped and counted per reason; bad
options stop it with exit status 2 before any input is read. On
success a summary table (users, items, instances per task and split) is printed.
"""

from __future__ import annotations

import argparse
import sys

from conure_dist.data.badinput import BadInputError
from conure_dist.data.format import SPLITS, DatasetFormatError, DatasetInfo


def format_summary(info: DatasetInfo) -> str:
    """The table printed by ``prepare``: one row per task, instances per split."""
    header = ["task", "kind", "labels", "users", *SPLITS, "total"]
    rows = []
    for t in info.tasks:
        counts = [t.counts[s] for s in SPLITS]
        labels = "-" if t.kind == "sequence" else str(t.num_labels)
        rows.append([t.name, t.kind, labels, str(t.num_users), *map(str, counts), str(sum(counts))])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    oov = f", OOV item id {info.oov_item_id}" if info.oov_item_id is not None else ""
    head = f"{info.path}\n  source {info.source}, users {info.num_users}, items {info.num_items}{oov}, split seed {info.seed}"
    return "\n".join([head, line(header), *map(line, rows)])


def _common(p: argparse.ArgumentParser, raw: bool = True) -> None:
    if raw:
        p.add_argument("--raw", required=True, help="directory (or URI: s3://, gs://) with the downloaded files")
    p.add_argument("--out", required=True,
                   help="output directory or URI (s3://, gs://, abfs://); must not exist unless --overwrite")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--rows-per-shard", type=int, default=100_000, help="rows per Parquet file (default 100000)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    if raw:
        p.add_argument("--skip-bad", action="store_true",
                       help="skip malformed rows (counted and reported) instead of stopping")


def add_prepare_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``prepare`` and its three sources on an argparse subparsers object."""
    from conure_dist.data.ttl import MAX_CLASSES, TOKEN_PATTERN

    prepare = subparsers.add_parser("prepare", help="convert raw data into a prepared dataset")
    sources = prepare.add_subparsers(dest="source", required=True)

    ttl = sources.add_parser("ttl", help="the TTL files released with the Conure paper")
    _common(ttl)
    ttl.add_argument("--task", action="append", metavar="NAME=FILE:KIND", default=None,
                     help="a task, in order (repeat); default: the six TTL files. KIND: sequence|item|class")
    ttl.add_argument("--token-pattern", default=TOKEN_PATTERN, metavar="REGEX",
                     help=f"what an item token or label must be (full match; default {TOKEN_PATTERN}: integer ids)")
    ttl.add_argument("--classes", action="append", default=None, metavar="NAME=A,B,...",
                     help="the labels of class task NAME (repeat per task); other labels are bad lines")
    ttl.add_argument("--max-classes", type=int, default=MAX_CLASSES,
                     help=f"most distinct labels of a class task without --classes (default {MAX_CLASSES})")
    ttl.add_argument("--allow-new-users", action="store_true",
                     help="accept later-task sequences that match no first-task user (counted), instead of stopping")

    ml = sources.add_parser("movielens", help="MovieLens 100K or 1M (layout detected)")
    _common(ml)
    ml.add_argument("--min-clicks", type=int, default=3, help="drop users with fewer T1 interactions (default 3)")
    ml.add_argument("--max-clicks", type=int, default=30, help="T1 keeps the most recent N (default 30)")

    syn = sources.add_parser("synthetic", help="generated TTL-shaped data with planted structure")
    _common(syn, raw=False)
    syn.add_argument("--preset", default="demo", help="demo | ttl-small | ttl (default demo)")
    syn.add_argument("--num-users", type=int, default=None, help="override the preset's user count")
    syn.add_argument("--num-items", type=int, default=None, help="override the preset's item count")
    syn.add_argument("--seq-len", type=int, default=None, help="override the preset's longest sequence")

    prepare.set_defaults(func=run_prepare)
    return prepare


def run_prepare(args: argparse.Namespace) -> int:
    """Exit status 0, 2 for bad options, 1 for bad data (or storage that cannot be reached)."""
    try:
        convert = _converter(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        info, report = convert()
    except (BadInputError, DatasetFormatError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_summary(info))
    for key, value in report.items():
        print(f"{key}: {value}" if not isinstance(value, str) or "\n" not in value else value)
    return 0


def _converter(args: argparse.Namespace):
    """The conversion the options ask for, as a callable; bad options raise ValueError here,
    before any input is read."""
    if args.rows_per_shard < 1:
        raise ValueError(f"--rows-per-shard must be >= 1, got {args.rows_per_shard}")
    if args.source == "ttl":
        from conure_dist.data.ttl import DEFAULT_TASKS, TaskFile, TTLOptions, prepare_ttl

        tasks = tuple(TaskFile.parse(t) for t in args.task) if args.task else DEFAULT_TASKS
        options = TTLOptions(tasks=tasks, seed=args.seed, skip_bad=args.skip_bad, rows_per_shard=args.rows_per_shard,
                             overwrite=args.overwrite, token_pattern=args.token_pattern,
                             allow_new_users=args.allow_new_users, max_classes=args.max_classes,
                             classes=TTLOptions.parse_classes(args.classes))
        return lambda: prepare_ttl(args.raw, args.out, options)
    if args.source == "movielens":
        from conure_dist.data.movielens import MovieLensOptions, prepare_movielens

        options = MovieLensOptions(max_clicks=args.max_clicks, min_clicks=args.min_clicks, seed=args.seed,
                                   skip_bad=args.skip_bad, rows_per_shard=args.rows_per_shard, overwrite=args.overwrite)
        return lambda: prepare_movielens(args.raw, args.out, options)
    from conure_dist.data.synthetic import prepare_synthetic, resolve_config

    preset = resolve_config(args.preset)
    min_seq_len = None if args.seq_len is None else min(preset.min_seq_len, args.seq_len)  # a shorter --seq-len shortens all
    config = resolve_config(preset, num_users=args.num_users, num_items=args.num_items, seq_len=args.seq_len,
                            min_seq_len=min_seq_len, rows_per_shard=args.rows_per_shard)
    return lambda: (prepare_synthetic(config, args.out, args.seed, overwrite=args.overwrite), {"preset": args.preset})
