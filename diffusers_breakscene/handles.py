"""Handle tokens: add them to a tokenizer and text encoder, train only their rows, read them back.

A handle (``"<asset0>"``) is one new token whose embedding row is learned, or, with
``vectors_per_handle=k > 1``, k tokens named as diffusers names a multi-vector textual inversion
(``"<asset0>"``, ``"<asset0>_1"``, ... ``"<asset0>_{k-1}"``): a prompt that says ``"<asset0>"``
reads all k (diffusers' pipelines expand it, :func:`expand_handles` does it for training).
Training goes through :class:`HandleEmbedding`, which wraps the text encoder's input embedding
and keeps the handle rows as a small trainable parameter: the optimizer never sees (or copies)
the vocabulary matrix, and every other row stays bit-identical by construction, not by restoring
it after each step.

Initialisation rule: a handle with an initializer word starts at the MEAN of the embeddings of
the word's sub-tokens (a word the tokenizer splits into several pieces keeps all of them, unlike
the reference code, which silently used the first). With k vectors the sub-tokens are split in
k consecutive groups and vector j starts at the mean of group j, so ``"red striped star"`` with
k = 3 starts as those three words; with fewer sub-tokens than vectors, sub-tokens repeat
(``"pink star"``, k = 3: ``pink pink star``). A handle without one starts at the row of a
random ordinary vocabulary token drawn from ``generator`` (ours; k draws for k vectors). The
reference code instead copies fixed rows, ``[-3N:-2N]`` of the embedding matrix for N handles;
for one handle that is the start-of-text row, a special token no prompt word resembles.

Example:
    >>> from diffusers_breakscene.handles import add_handles, get_handle_embeddings
    >>> from diffusers_breakscene.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline("sd1")
    >>> ids = add_handles(pipe.tokenizer, pipe.text_encoder, ["<asset0>"], ["dog"])
    >>> rows = get_handle_embeddings(pipe.tokenizer, pipe.text_encoder, ["<asset0>"])
    >>> tuple(rows["<asset0>"].shape)
    (1, 32)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import InvalidSceneError, TokenConflictError, fail

__all__ = [
    "HandleEmbedding",
    "add_handles",
    "check_handle_names",
    "check_not_words",
    "expand_handles",
    "get_handle_embeddings",
    "handle_vectors",
    "initial_handle_rows",
    "set_handle_embeddings",
    "token_ids",
    "vector_names",
    "vector_tokens",
    "vocabulary_words",
]


def vector_tokens(token: str, vectors: int = 1) -> list[str]:
    """The token names of a handle of ``vectors`` rows, diffusers' multi-vector convention.

    Example:
        >>> vector_tokens("<asset0>", 3)
        ['<asset0>', '<asset0>_1', '<asset0>_2']
    """
    return [token] + [f"{token}_{i}" for i in range(1, _vector_count(vectors))]


def _vector_count(vectors: int) -> int:
    if isinstance(vectors, bool) or not isinstance(vectors, int) or vectors < 1:
        raise ValueError(f"vectors={vectors!r} must be an integer >= 1 (rows per handle).")
    return vectors


def vector_names(tokens: Sequence[str], vectors: int = 1) -> list[str]:
    """All token names of ``tokens`` as handles of ``vectors`` rows, in order; raises
    :class:`TokenConflictError` when one handle's vector is another handle's name.

    Example:
        >>> vector_names(["<a>", "<b>"], 2)
        ['<a>', '<a>_1', '<b>', '<b>_1']
    """
    names = [name for token in tokens for name in vector_tokens(token, vectors)]
    if len(set(names)) != len(names):
        raise TokenConflictError(
            f"Handle tokens {list(tokens)} collide with each other's vectors ({names}); rename "
            "them so that none is another's name plus '_1', '_2', ..."
        )
    return names


def handle_vectors(tokenizer: Any, token: str) -> list[str]:
    """``token`` and the ``token_1``, ``token_2``, ... the tokenizer holds (as diffusers'
    ``maybe_convert_prompt`` finds them): the token names of a handle's vectors.

    Example:
        >>> from diffusers_breakscene.tiny import tiny_tokenizer
        >>> tokenizer = tiny_tokenizer()
        >>> _ = tokenizer.add_tokens(vector_tokens("<a>", 3))
        >>> handle_vectors(tokenizer, "<a>")
        ['<a>', '<a>_1', '<a>_2']
    """
    added = tokenizer.get_added_vocab()
    names = [token]
    while f"{token}_{len(names)}" in added:
        names.append(f"{token}_{len(names)}")
    return names


def expand_handles(prompt: str, tokenizer: Any, tokens: Sequence[str]) -> str:
    """``prompt`` with each handle of ``tokens`` written as all its vectors
    (``"<asset0>"`` -> ``"<asset0> <asset0>_1 <asset0>_2"``); handles of one vector, and any
    other text, stay as they are.

    diffusers' pipelines do this themselves (``maybe_convert_prompt``) for every prompt they
    encode; this version is for prompts tokenized outside a pipeline (training). Written here
    because ``maybe_convert_prompt`` replaces substrings, so with ``<asset1>`` and ``<asset10>``
    both multi-vector it also rewrites the inside of ``<asset10>``; this matches whole handles,
    longest first, as the tokenizer splits added tokens.

    Example:
        >>> from diffusers_breakscene.tiny import tiny_tokenizer
        >>> tokenizer = tiny_tokenizer()
        >>> _ = tokenizer.add_tokens(vector_tokens("<a>", 2) + ["<b>"])
        >>> expand_handles("a photo of <a> and <b>", tokenizer, ["<a>", "<b>"])
        'a photo of <a> <a>_1 and <b>'
    """
    names = {t: handle_vectors(tokenizer, t) for t in tokens}
    names = {t: " ".join(v) for t, v in names.items() if len(v) > 1}
    if not names:
        return prompt
    pattern = re.compile("|".join(re.escape(t) for t in sorted(names, key=len, reverse=True)))
    return pattern.sub(lambda match: names[match.group(0)], prompt)


def token_ids(tokenizer: Any, tokens: Sequence[str]) -> list[int]:
    """The ids of ``tokens`` in ``tokenizer``, each of which must be a single known token."""
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    missing = [
        t for t, i in zip(tokens, ids, strict=True) if i is None or i == tokenizer.unk_token_id
    ]
    if missing:
        raise TokenConflictError(f"Tokens {missing} are not in the tokenizer; add them first.")
    return list(ids)


def _existing(tokenizer: Any, tokens: Sequence[str]) -> list[str]:
    vocab = tokenizer.get_vocab()
    return [t for t in tokens if t in vocab]


def vocabulary_words(tokenizer: Any, tokens: Sequence[str]) -> dict[str, str]:
    """``{handle: vocabulary entry}`` for the handles the tokenizer already reads as one ordinary
    vocabulary word (``"dog"`` is CLIP's ``"dog</w>"``).

    Such a handle, added as a token, would take over that word in every prompt (and inside
    longer words: added tokens match anywhere). ``"<asset0>"`` splits into several pieces and
    is no word. Tokens already added to the tokenizer are not words (see :func:`_existing`).

    Example:
        >>> from diffusers_breakscene.tiny import tiny_tokenizer
        >>> vocabulary_words(tiny_tokenizer(), ["dog", "<asset0>", "Cat"])
        {'dog': 'dog</w>', 'Cat': 'cat</w>'}
    """
    added = set(tokenizer.get_added_vocab())
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    words = {}
    for token in tokens:
        pieces = tokenizer.tokenize(token)
        if len(pieces) == 1 and pieces[0] not in added | special:
            words[token] = pieces[0]
    return words


def _not_a_word(token: str) -> str:
    core = token.strip("<>") or "asset0"
    return f"<{core}>"


def check_not_words(
    tokenizer: Any, tokens: Sequence[str], what: str = "handles", fix: str | None = None
) -> None:
    """Raise :class:`TokenConflictError` if a handle is an ordinary word of the tokenizer's
    vocabulary (:func:`vocabulary_words`). ``fix`` replaces the default advice, "use a name like
    '<dog>' that is not a word".

    Example:
        >>> from diffusers_breakscene.tiny import tiny_tokenizer
        >>> check_not_words(tiny_tokenizer(), ["<asset0>"])
        >>> check_not_words(tiny_tokenizer(), ["dog"])
        Traceback (most recent call last):
        ...
        diffusers_breakscene.errors.TokenConflictError: handles ['dog'] are ordinary words of the tokenizer's vocabulary ('dog' is 'dog</w>'), so a handle would change what that word means in every prompt; use a name like '<dog>' that is not a word
    """  # noqa: E501
    words = vocabulary_words(tokenizer, tokens)
    if words:
        token, entry = next(iter(words.items()))
        fail(
            TokenConflictError,
            f"{what} {list(words)} are ordinary words of the tokenizer's vocabulary "
            f"({token!r} is {entry!r}), so a handle would change what that word means in every "
            "prompt",
            fix or f"use a name like {_not_a_word(token)!r} that is not a word",
        )


def check_handle_names(
    tokenizer: Any, tokens: Sequence[str], what: str = "handles", where: str = ""
) -> None:
    """Refuse, before anything changes, handles the tokenizer already holds: added tokens
    (``"<asset0>"`` added twice) and ordinary words (``"dog"``); raises
    :class:`TokenConflictError` naming the handles and where to rename them (``where``, e.g.
    ``"Scene(..., tokens=[...])"``).

    Example:
        >>> from diffusers_breakscene.tiny import tiny_tokenizer
        >>> tokenizer = tiny_tokenizer()
        >>> check_handle_names(tokenizer, ["<asset0>", "<asset1>"])
        >>> _ = tokenizer.add_tokens(["<asset0>"])
        >>> check_handle_names(tokenizer, ["<asset0>"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        diffusers_breakscene.errors.TokenConflictError: handles ['<asset0>'] already exist in the tokenizer; choose other handle names...
    """  # noqa: E501
    tokens = list(tokens)
    where = f" with {where}" if where else ""
    clash = _existing(tokenizer, tokens)
    if clash:
        fail(
            TokenConflictError,
            f"{what} {clash} already exist in the tokenizer",
            f"choose other handle names{where} (for example '<scene1_asset0>') or unload what "
            "added them",
        )
    words = vocabulary_words(tokenizer, tokens)
    if words:
        example = _not_a_word(next(iter(words)))
        check_not_words(
            tokenizer, tokens, what, f"use a name like {example!r} that is not a word{where}"
        )


def initial_handle_rows(
    tokenizer: Any,
    text_encoder: Any,
    initializer_tokens: Sequence[str | None],
    generator: torch.Generator | None = None,
    vectors_per_handle: int = 1,
) -> torch.Tensor:
    """``(n * k, d)`` starting rows for ``n`` handles of ``k = vectors_per_handle`` rows each
    (a handle's rows together), by the module's initialisation rule.

    Example:
        >>> from diffusers_breakscene.tiny import tiny_pipeline
        >>> pipe = tiny_pipeline("sd1")
        >>> initial_handle_rows(pipe.tokenizer, pipe.text_encoder, ["dog", None]).shape
        torch.Size([2, 32])
        >>> initial_handle_rows(pipe.tokenizer, pipe.text_encoder, ["red dog"], None, 2).shape
        torch.Size([2, 32])
    """
    k = _vector_count(vectors_per_handle)
    weight = text_encoder.get_input_embeddings().weight.detach()
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(weight.shape[0]) if i not in special])
    rows = []
    for position, word in enumerate(initializer_tokens):
        if word is None:
            picks = torch.randint(len(ordinary), (k,), generator=generator)
            rows += [weight[ordinary[int(pick)]].float() for pick in picks]
            continue
        if not isinstance(word, str) or not word.strip():
            raise InvalidSceneError(
                f"initializer_tokens[{position}]={word!r} must be a non-empty word or None."
            )
        pieces = tokenizer(word, add_special_tokens=False).input_ids
        if not pieces:
            raise InvalidSceneError(
                f"initializer_tokens[{position}]={word!r} tokenizes to nothing; use a real word."
            )
        m = len(pieces)
        for j in range(k):  # k consecutive groups of the m pieces (repeating when m < k)
            start = j * m // k
            group = pieces[start : max((j + 1) * m // k, start + 1)]
            rows.append(weight[group].float().mean(dim=0))
    return torch.stack(rows).to(weight.dtype)


def add_handles(
    tokenizer: Any,
    text_encoder: Any,
    tokens: Sequence[str],
    initializer_tokens: Sequence[str | None] | None = None,
    generator: torch.Generator | None = None,
    *,
    vectors_per_handle: int = 1,
) -> list[int]:
    """Add ``tokens`` to the tokenizer, grow the embedding matrix, initialise the new rows.

    With ``vectors_per_handle=k > 1`` each handle is k tokens (:func:`vector_tokens`).
    Tokens that already exist, and ordinary vocabulary words such as ``"dog"``, are refused
    (:class:`TokenConflictError`, :func:`check_handle_names`) before anything changes.
    Returns the new token ids, in order (a handle's k ids together).

    Example:
        >>> from diffusers_breakscene.tiny import tiny_pipeline
        >>> pipe = tiny_pipeline("sd1")
        >>> add_handles(pipe.tokenizer, pipe.text_encoder, ["<a>", "<b>"]) == [
        ...     len(pipe.tokenizer) - 2, len(pipe.tokenizer) - 1]
        True
    """
    tokens = list(tokens)
    initializer_tokens = list(initializer_tokens or [None] * len(tokens))
    if len(initializer_tokens) != len(tokens):
        raise InvalidSceneError(
            f"Got {len(initializer_tokens)} initializer tokens for {len(tokens)} handles; give "
            "one word (or None) per handle."
        )
    if len(set(tokens)) != len(tokens):
        raise TokenConflictError(f"Handle tokens {tokens} contain duplicates; make them unique.")
    names = vector_names(tokens, vectors_per_handle)
    check_handle_names(tokenizer, names, "Tokens")
    rows = initial_handle_rows(
        tokenizer, text_encoder, initializer_tokens, generator, vectors_per_handle
    )

    tokenizer.add_tokens(names)
    ids = token_ids(tokenizer, names)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[ids] = rows
    return ids


def get_handle_embeddings(
    tokenizer: Any, text_encoder: Any, tokens: Sequence[str]
) -> dict[str, torch.Tensor]:
    """``{token: (k, d) float32 tensor}`` copies of the current rows of ``tokens``: k = 1, or
    the handle's vectors ``token``, ``token_1``, ... that the tokenizer holds.

    Example:
        >>> from diffusers_breakscene.tiny import tiny_pipeline
        >>> pipe = tiny_pipeline("sd1")
        >>> _ = add_handles(pipe.tokenizer, pipe.text_encoder, ["<a>"])
        >>> list(get_handle_embeddings(pipe.tokenizer, pipe.text_encoder, ["<a>"]))
        ['<a>']
    """
    embedding = text_encoder.get_input_embeddings()
    if isinstance(embedding, HandleEmbedding):
        return embedding.rows_by_token(tokenizer, tokens)
    weight = embedding.weight.detach()
    return {
        t: weight[token_ids(tokenizer, handle_vectors(tokenizer, t))].float().cpu().clone()
        for t in tokens
    }


def set_handle_embeddings(
    tokenizer: Any, text_encoder: Any, rows: Mapping[str, torch.Tensor]
) -> None:
    """Write ``{token: (k, d) tensor}`` rows into the embedding matrix: the handle's k vectors
    (``token``, ``token_1``, ...) must exist in the tokenizer; a ``(d,)`` row is ``(1, d)``.

    Example:
        >>> import torch
        >>> from diffusers_breakscene.tiny import tiny_pipeline
        >>> pipe = tiny_pipeline("sd1")
        >>> _ = add_handles(pipe.tokenizer, pipe.text_encoder, ["<a>"])
        >>> set_handle_embeddings(pipe.tokenizer, pipe.text_encoder, {"<a>": torch.ones(1, 32)})
    """
    weight = text_encoder.get_input_embeddings().weight
    ids = {}
    for token, row in rows.items():
        names = handle_vectors(tokenizer, token)
        ids[token] = token_ids(tokenizer, names)
        expected = (len(names), weight.shape[1])
        if tuple(row.reshape(-1, row.shape[-1]).shape) != expected or row.dim() > 2:
            raise ValueError(
                f"Rows for {token!r} have shape {tuple(row.shape)}; expected {expected} (the "
                f"tokenizer holds {len(names)} vector(s) of it)."
            )
    with torch.no_grad():
        for token, row in rows.items():
            weight[ids[token]] = row.reshape(len(ids[token]), -1).to(weight.device, weight.dtype)


class HandleEmbedding(nn.Module):
    """An input embedding whose handle rows are a separate trainable parameter.

    ``forward`` looks every id up in the frozen base embedding and swaps in ``handle_weight`` at
    handle positions, so gradients reach only the handle rows and the base matrix is never
    written. :meth:`install` puts it into a text encoder; :meth:`uninstall` writes the learned
    rows into the base matrix and puts the base embedding back.

    Example:
        >>> from diffusers_breakscene.tiny import tiny_pipeline
        >>> pipe = tiny_pipeline("sd1")
        >>> ids = add_handles(pipe.tokenizer, pipe.text_encoder, ["<a>"])
        >>> wrapper = HandleEmbedding.install(pipe.text_encoder, ids)
        >>> [n.split(".")[-1] for n, p in pipe.text_encoder.named_parameters() if p.requires_grad]
        ['handle_weight']
        >>> wrapper.uninstall(pipe.text_encoder)
    """

    def __init__(self, base: nn.Embedding, handle_ids: Sequence[int]) -> None:
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.register_buffer("handle_ids", torch.tensor(list(handle_ids), dtype=torch.long))
        # Trainable rows are kept in float32 whatever the base dtype (mixed precision).
        self.handle_weight = nn.Parameter(base.weight.detach()[list(handle_ids)].float().clone())

    @property
    def weight(self) -> torch.Tensor:
        """The base matrix (read-only view for code that inspects ``.weight``)."""
        return self.base.weight

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    @classmethod
    def install(cls, text_encoder: Any, handle_ids: Sequence[int]) -> HandleEmbedding:
        """Wrap ``text_encoder``'s input embedding and freeze everything else in it."""
        base = text_encoder.get_input_embeddings()
        if isinstance(base, HandleEmbedding):
            raise RuntimeError("This text encoder already has a HandleEmbedding installed.")
        text_encoder.requires_grad_(False)
        wrapper = cls(base, handle_ids).to(base.weight.device)
        text_encoder.set_input_embeddings(wrapper)
        return wrapper

    def uninstall(self, text_encoder: Any) -> None:
        """Write the learned rows into the base matrix and restore the base embedding."""
        self.write_back()
        text_encoder.set_input_embeddings(self.base)

    def write_back(self) -> None:
        """Copy the learned rows into the base matrix (no other row changes)."""
        with torch.no_grad():
            self.base.weight[self.handle_ids] = self.handle_weight.detach().to(
                self.base.weight.dtype
            )

    def rows_by_token(self, tokenizer: Any, tokens: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{token: (k, d) float32}`` copies of the learned rows of ``tokens`` (k vectors)."""
        position = {int(i): k for k, i in enumerate(self.handle_ids.tolist())}
        rows = {}
        for token in tokens:
            vectors = []
            for index in token_ids(tokenizer, handle_vectors(tokenizer, token)):
                if index in position:
                    vectors.append(self.handle_weight[position[index]])
                else:
                    vectors.append(self.base.weight[index])
            rows[token] = torch.stack(vectors).detach().float().cpu().clone()
        return rows

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.base(input_ids)
        matches = input_ids.unsqueeze(-1) == self.handle_ids  # (..., n_handles)
        handle_rows = matches.to(self.handle_weight.dtype) @ self.handle_weight
        is_handle = matches.any(dim=-1, keepdim=True)
        return torch.where(is_handle, handle_rows.to(embeds.dtype), embeds)
