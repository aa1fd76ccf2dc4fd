"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os

# Tiny test models spend most of their time compiling: XLA's cheaper CPU backend passes
# roughly halve that and leave results deterministic (exact-resume tests compare runs that
# were compiled the same way).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402 - jax flags above must be set before anything imports jax


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A ~150 kB text file of stdlib docstrings, documents separated by blank lines."""
    from plm_jax.data.sources import python_stdlib_docstrings

    docs = [d.replace("\n\n", "\n") for d in python_stdlib_docstrings()[:600]]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path


@pytest.fixture(scope="session")
def small_tokenizer(small_corpus, tmp_path_factory):
    """A 512-piece SentencePiece BPE model trained on `small_corpus`."""
    from plm_jax.tokenizer import train_tokenizer

    text = small_corpus.read_text().split("\n\n")
    return train_tokenizer(
        text, tmp_path_factory.mktemp("tok"), vocab_size=512, show_progress=False
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, small_corpus, small_tokenizer):
    """A run directory holding a 1-layer decoder trained for 4 steps (checkpoints at 2 and 4)."""
    from plm_jax.config import load_config
    from plm_jax.train.loop import pretrain

    tmp = tmp_path_factory.mktemp("tiny_run")
    cfg = load_config(
        None,
        [
            f"data.source={small_corpus}",
            f"data.cache_dir={tmp / 'cache'}",
            f"run.dir={tmp / 'run'}",
            f"tokenizer.path={small_tokenizer.path}",
            "model.max_seq_len=32",
            "model.num_layers=1",
            "model.embed_dim=32",
            "train.batch_size=8",
            "train.steps=4",
            "train.warmup_steps=1",
            "train.log_every=2",
            "train.eval_every=4",
            "train.eval_batches=0",
            "checkpoint.save_every=2",
        ],
    )
    pretrain(cfg, show_progress=False)
    return tmp / "run"
