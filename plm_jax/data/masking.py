"""Dynamic masking for BERT-style masked-LM pretraining: one example in, one corrupted copy out.

`MlmMasker` is a per-example numpy transform for grain's `MapDataset.random_map`. For a `[T]`
example it selects prediction positions and corrupts them (Devlin et al. 2019, section 3.1):

    eligible   segment_id != 0 (not padding) and the token is not a special id (the mask id
               always counts as special)
    selected   each eligible token, independently, with probability `mask_prob`, as Hugging
               Face's `DataCollatorForLanguageModeling` does; with `whole_word`, each eligible
               word instead, and then all its tokens (Google's `create_pretraining_data.py`)
    corrupted  each selected token independently: 80% -> mask id, 10% -> a token drawn
               uniformly from the non-special ids in [0, vocab_size), 10% left unchanged

and returns `inputs` = corrupted ids, `targets` = the original ids, `weights` = float32 1.0 at
selected positions (the only ones the loss reads); other fields pass through.

A word starts at a token whose `word_starts` entry is True, at a segment boundary, at a special
token and right after one; it runs until the next start. Special tokens are therefore
single-token words that are never selected, and an end-of-document piece that does not mark a
word start (SentencePiece's `</s>`) cannot make the word before it ineligible.

Reproducibility: grain seeds the generator handed to the transform from the pipeline seed and
the element's index in the dataset, and the masker draws only from that generator. The mask of
element k is thus a pure function of (seed, k): the same on every run and every process, and
restored exactly when an iterator resumes from `{"next_index": k}`. Placed after `repeat`, the
copies of a window in different epochs have different indices and so get fresh masks (dynamic
masking, as in RoBERTa). What it leaves out: span masking, n-gram masking and batching.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from plm_jax.errors import ConfigError

MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of selected tokens; the remaining 0.1 stay unchanged


class MlmMasker:
    """Selects and corrupts masked-LM targets of one example; pass it to `random_map`.

    Args:
      mask_id: the mask token ([MASK]) written into 80% of selected positions.
      vocab_size: V, the tokenizer's size; every id in an example must be below it.
      special_ids: ids that are never selected and never drawn as random replacements
        (padding, bos, eos, cls, sep, mask, ...). `mask_id` is added to them.
      mask_prob: chance that an eligible token (or word, with `whole_word`) is selected.
      whole_word: select whole words instead of single tokens.
      word_starts: `[V]` bool, True for tokens that begin a word; required with `whole_word`.

    Raises:
      ValueError: an argument out of range, `word_starts` missing or of the wrong shape, or no
        non-special id left to draw random replacements from.
    """

    def __init__(
        self,
        *,
        mask_id: int,
        vocab_size: int,
        special_ids: Iterable[int],
        mask_prob: float = 0.15,
        whole_word: bool = False,
        word_starts: np.ndarray | None = None,
    ):
        if vocab_size < 2:
            raise ValueError(f"vocab_size={vocab_size} must be at least 2")
        if not 0 <= mask_id < vocab_size:
            raise ValueError(f"mask_id={mask_id} is outside the vocabulary [0, {vocab_size})")
        if not 0.0 < mask_prob <= 1.0:
            raise ValueError(f"mask_prob={mask_prob} must be in (0, 1]; BERT and RoBERTa use 0.15")
        special = sorted({int(i) for i in special_ids} | {mask_id})
        bad = [i for i in special if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"special ids {bad} are outside the vocabulary [0, {vocab_size})")
        self.is_special = np.zeros(vocab_size, bool)
        self.is_special[special] = True
        self.replacement_ids = np.flatnonzero(~self.is_special).astype(np.int32)
        if self.replacement_ids.size == 0:
            raise ValueError(
                f"all {vocab_size} ids are special; random replacements need a non-special id"
            )
        if whole_word and word_starts is None:
            raise ValueError(
                "whole_word=True needs word_starts, a [vocab_size] bool array marking the "
                "tokens that begin a word (tokenizer.word_starts())"
            )
        if word_starts is not None:
            word_starts = np.asarray(word_starts)
            if word_starts.dtype != bool or word_starts.shape != (vocab_size,):
                raise ValueError(
                    f"word_starts must be a bool array of shape ({vocab_size},) (vocab_size); "
                    f"got {word_starts.dtype} {word_starts.shape}"
                )
        self.mask_id, self.vocab_size, self.mask_prob = mask_id, vocab_size, mask_prob
        self.whole_word = whole_word
        self.word_starts = word_starts

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Any, *, mask_prob: float = 0.15, whole_word: bool = False
    ) -> MlmMasker:
        """A masker for `tokenizer`: its mask id, vocabulary size, special ids and word starts.

        Raises:
          ConfigError: the tokenizer has no mask token.
        """
        if tokenizer.mask_id is None:
            raise ConfigError(
                "the tokenizer has no mask token, which masked-LM training needs; set "
                "tokenizer.mask_piece or use a tokenizer with [MASK]"
            )
        return cls(
            mask_id=tokenizer.mask_id,
            vocab_size=tokenizer.vocab_size,
            special_ids=tokenizer.special_ids,
            mask_prob=mask_prob,
            whole_word=whole_word,
            word_starts=tokenizer.word_starts() if whole_word else None,
        )

    def __call__(
        self, example: dict[str, np.ndarray], rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        """Masks one example.

        Args:
          example: `inputs` ([T] int, original ids) and `segment_ids` ([T] int, 0 = padding);
            any other fields are copied through unchanged (`targets`, `weights` are replaced).
          rng: the generator grain derives from the seed and the element's index.

        Returns:
          A new dict: `inputs` [T] corrupted ids, `targets` [T] original ids, `weights` [T]
          float32 (1.0 at selected positions), plus the other fields of `example`.
        """
        tokens = np.asarray(example["inputs"])
        segments = np.asarray(example["segment_ids"])
        T = tokens.shape[0]
        special = self.is_special[tokens]
        eligible = (segments != 0) & ~special
        # A fixed number of draws per call, whatever the content, so each use of the generator
        # is easy to follow; grain reseeds it per element anyway.
        select_draw, action_draw = rng.random(T), rng.random(T)
        replacement = self.replacement_ids[rng.integers(self.replacement_ids.size, size=T)]
        if self.whole_word:
            word = self._word_index(tokens, segments, special)
            # A word is eligible only if all its tokens are; word k uses draw k.
            num_words = word[-1] + 1 if T else 0
            blocked = np.bincount(word, weights=~eligible, minlength=num_words) > 0
            selected = ~blocked[word] & (select_draw[word] < self.mask_prob)
        else:
            selected = eligible & (select_draw < self.mask_prob)
        to_mask = selected & (action_draw < MASK_SHARE)
        to_random = (
            selected & (action_draw >= MASK_SHARE) & (action_draw < MASK_SHARE + RANDOM_SHARE)
        )
        corrupted = tokens.copy()
        corrupted[to_mask] = self.mask_id
        corrupted[to_random] = replacement[to_random]
        out = {k: v for k, v in example.items() if k not in ("inputs", "targets", "weights")}
        out["inputs"] = corrupted
        out["targets"] = tokens.copy()
        out["weights"] = selected.astype(np.float32)
        return out

    def _word_index(
        self, tokens: np.ndarray, segments: np.ndarray, special: np.ndarray
    ) -> np.ndarray:
        """[T] int: 0, 1, ... numbering the words left to right (see the module docstring)."""
        starts = self.word_starts[tokens] | special
        starts[1:] |= (segments[1:] != segments[:-1]) | special[:-1]
        if starts.size:
            starts[0] = True
        return np.cumsum(starts) - 1
