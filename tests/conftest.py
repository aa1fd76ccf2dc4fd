"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
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
