"""A small English -> LANG parallel corpus from the system's gettext catalogs.

    python scripts/gettext_pairs.py --lang de --out DIR [--max-chars 200] [--seed 0]
        [--valid 1000 --test 1000] [--locale-dir /usr/share/locale]

Reads every `<locale-dir>/<lang>/LC_MESSAGES/*.mo` with Python's `gettext.GNUTranslations` (the
catalogs are parsed as data; nothing in them is executed), and takes each English msgid and its
translation as one pair. It skips the header, the extra forms of plural entries (only the
singular msgid with its first translation is kept), empty and untranslated (identical) pairs,
entries that are only format strings and punctuation (`%s: %d`, `{0}`), and entries longer than
`--max-chars` characters on either side; it keeps the first translation of each source string
(catalogs read in name order). The unique sources are shuffled with `--seed` and split into
test, valid and train, so no test or valid source appears in train. It writes train.jsonl,
valid.jsonl and test.jsonl (`{"source": ..., "target": ...}` a line, UTF-8), train_text.txt
(both sides of the training pairs, a text a line, for training a tokenizer) and prints the
counts.

What it leaves out: message contexts (kept as plain pairs), keyboard accelerators (`_File`)
and line breaks inside entries are left as written; catalogs that cannot be read are skipped
and counted.
"""

from __future__ import annotations

import argparse
import gettext
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

# printf conversions (`%s`, `%-5.2f`, `%(name)s`, `%1$s`, `%%`), Python/.NET braces (`{0}`,
# `{name:>4}`) and `${var}`.
_FORMAT = re.compile(
    r"%(?:\d+\$)?(?:\([^)]*\))?[-+ #0']*(?:\*|\d+)?(?:\.(?:\*|\d+))?"
    r"(?:hh|h|ll|l|L|q|j|z|t|I64|I32)?[diouxXeEfFgGaAcspnm%]"
    r"|\$?\{[^{}]*\}"
)


def is_format_only(text: str) -> bool:
    """True when `text` holds no letters once its format specifiers are removed."""
    return not any(c.isalpha() for c in _FORMAT.sub("", text))


def catalog_pairs(path: Path) -> list[tuple[str, str]]:
    """(msgid, msgstr) of one .mo file: plural entries give (singular, first form) only.

    The header (msgid "") is included; `collect_pairs` drops it with the empty pairs.

    Raises:
      OSError: not a .mo file. UnicodeDecodeError: its strings are not in its declared charset.
    """
    with open(path, "rb") as f:
        catalog = gettext.GNUTranslations(f)._catalog  # no public way to list the entries
    pairs = []
    for key, value in catalog.items():
        if isinstance(key, tuple):  # (msgid, form index) of a plural entry
            msgid, form = key
            if form != 0:
                continue
        else:
            msgid = key
        pairs.append((msgid.rpartition("\x04")[2], value))  # drop a "context\x04" prefix
    return pairs


def collect_pairs(
    mo_files: list[Path], max_chars: int
) -> tuple[list[tuple[str, str]], Counter[str]]:
    """Filtered pairs from all catalogs, unique by source; counts of what was kept and skipped."""
    counts: Counter[str] = Counter()
    seen: dict[str, str] = {}
    for path in sorted(mo_files):
        try:
            entries = catalog_pairs(path)
        except (OSError, UnicodeDecodeError, ValueError):
            counts["unreadable catalogs"] += 1
            continue
        counts["catalogs"] += 1
        for source, target in entries:
            counts["entries"] += 1
            if not source.strip() or not target.strip():
                reason = "empty"
            elif source.strip() == target.strip():
                reason = "identical"
            elif is_format_only(source):
                reason = "format only"
            elif max(len(source), len(target)) > max_chars:
                reason = "too long"
            elif source in seen:
                reason = "duplicate source"
            else:
                seen[source] = target
                continue
            counts[f"skipped {reason}"] += 1
    return list(seen.items()), counts


def split_pairs(
    pairs: list[tuple[str, str]], *, seed: int, valid: int, test: int
) -> dict[str, list[tuple[str, str]]]:
    """A seeded split by source string: `test` and `valid` pairs held out, the rest train.

    Raises:
      ValueError: fewer pairs than `valid + test + 1`.
    """
    if len(pairs) <= valid + test:
        raise ValueError(
            f"only {len(pairs)} pairs, not enough for {valid} valid + {test} test + train; "
            "lower --valid/--test or --max-chars filtering"
        )
    order = sorted(pairs)  # independent of catalog order
    random.Random(seed).shuffle(order)
    return {
        "test": order[:test],
        "valid": order[test : test + valid],
        "train": order[test + valid :],
    }


def write_jsonl(path: Path, pairs: list[tuple[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for source, target in pairs:
            f.write(json.dumps({"source": source, "target": target}, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lang", required=True, help="locale directory name, e.g. de or pt_BR")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--max-chars", type=int, default=200, help="longest entry kept")
    parser.add_argument("--seed", type=int, default=0, help="split seed")
    parser.add_argument("--valid", type=int, default=1000, help="valid pairs")
    parser.add_argument("--test", type=int, default=1000, help="test pairs")
    parser.add_argument("--locale-dir", type=Path, default=Path("/usr/share/locale"))
    args = parser.parse_args(argv)
    if min(args.max_chars, args.valid + 1, args.test + 1) < 1:
        parser.error("--max-chars must be positive and --valid/--test >= 0")
    mo_files = list((args.locale_dir / args.lang / "LC_MESSAGES").glob("*.mo"))
    if not mo_files:
        print(
            f"error: no .mo catalogs in {args.locale_dir / args.lang / 'LC_MESSAGES'}; "
            "check --lang (ls --locale-dir)",
            file=sys.stderr,
        )
        return 2
    pairs, counts = collect_pairs(mo_files, args.max_chars)
    try:
        splits = split_pairs(pairs, seed=args.seed, valid=args.valid, test=args.test)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in splits.items():
        write_jsonl(args.out / f"{name}.jsonl", part)
    # Both sides of the training pairs, one text a line: what a tokenizer is trained on (never
    # the valid or test pairs).
    with open(args.out / "train_text.txt", "w", encoding="utf-8") as f:
        for source, target in splits["train"]:
            f.write(" ".join(source.split()) + "\n" + " ".join(target.split()) + "\n")
    print(", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(
        f"{args.lang}: kept {len(pairs)} pairs: train {len(splits['train'])}, "
        f"valid {len(splits['valid'])}, test {len(splits['test'])} in {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
