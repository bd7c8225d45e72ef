"""FastTokenizer: the part of transformers' tokenizer API shardserve and its users call, on the `tokenizers` package."""
from __future__ import annotations

from typing import Any

from shardserve.model.chat_template import render_chat

NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class FastTokenizer:
    """The part of transformers' tokenizer API the engine, the server and users of LLM.get_tokenizer() call,
    over a `tokenizers.Tokenizer`."""

    is_fast = True

    def __init__(self, backend, special_tokens: dict[str, Any], extra_special_tokens: list, chat_template: Any,
                 clean_up_tokenization_spaces: bool = False, name_or_path: str = "", add_bos_token: bool = False,
                 add_eos_token: bool = False):
        self._tokenizer = backend
        self._special = {k: v for k, v in special_tokens.items() if v is not None}     # name -> str or AddedToken
        self._extra = list(extra_special_tokens)
        self.chat_template = chat_template                # str, {name: str} or None
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.name_or_path = name_or_path
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token

    # ---- vocabulary -------------------------------------------------------------------------------
    @property
    def backend_tokenizer(self):
        return self._tokenizer

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int] | None:
        if isinstance(tokens, str):
            return self._token_id(tokens)
        return [self._token_id(t) for t in tokens]

    def _token_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        index = self._tokenizer.token_to_id(token)
        return index if index is not None else self.unk_token_id

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(i) for i in ids if i not in skip]

    # ---- special tokens ---------------------------------------------------------------------------
    def _named(self, name: str) -> str | None:
        value = self._special.get(name)
        return None if value is None else str(value)

    bos_token = property(lambda self: self._named("bos_token"))
    eos_token = property(lambda self: self._named("eos_token"))
    unk_token = property(lambda self: self._named("unk_token"))
    sep_token = property(lambda self: self._named("sep_token"))
    pad_token = property(lambda self: self._named("pad_token"))
    cls_token = property(lambda self: self._named("cls_token"))
    mask_token = property(lambda self: self._named("mask_token"))
    bos_token_id = property(lambda self: self._token_id(self.bos_token))
    eos_token_id = property(lambda self: self._token_id(self.eos_token))
    unk_token_id = property(lambda self: None if self.unk_token is None
                            else self._tokenizer.token_to_id(self.unk_token))
    pad_token_id = property(lambda self: self._token_id(self.pad_token))

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens as strings (what chat templates see as bos_token, eos_token, ...)."""
        return {name: str(self._special[name]) for name in NAMED_SPECIALS if name in self._special}

    @property
    def extra_special_tokens(self) -> list[str]:
        return [str(t) for t in self._extra]

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys([*self.special_tokens_map.values(), *self.extra_special_tokens]))

    @property
    def all_special_ids(self) -> list[int]:
        return [self._token_id(t) for t in self.all_special_tokens]

    # ---- encode / decode --------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text input must be of type `str`, got {type(text).__name__}")
        # encode_batch, as transformers calls it: it releases the GIL (encode does not), so a huge prompt
        # tokenized in a worker thread does not stall the server's event loop
        return self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def __call__(self, text: str | list[str], add_special_tokens: bool = True, **kwargs: Any) -> dict:
        """{"input_ids", "attention_mask"} for one text (lists) or a batch (lists of lists); no padding."""
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens)
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        ids = [self.encode(t, add_special_tokens) for t in text]
        return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}

    def decode(self, token_ids: int | list[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None, **kwargs: Any) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        text = self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        clean = clean_up_tokenization_spaces
        if clean is None:
            clean = self.clean_up_tokenization_spaces
        if clean and type(self._tokenizer.model).__name__ != "BPE":   # transformers never cleans BPE output
            text = clean_up_tokenization(text)
        return text

    def batch_decode(self, sequences: list[list[int]], **kwargs: Any) -> list[str]:
        return [self.decode(seq, **kwargs) for seq in sequences]

    # ---- chat -------------------------------------------------------------------------------------
    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """transformers' choice: a named template of a dict ("tool_use" with tools, else "default"), else the
        template given, else the tokenizer's own."""
        if isinstance(self.chat_template, dict):
            if chat_template is not None and chat_template in self.chat_template:
                return self.chat_template[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in self.chat_template:
                    return self.chat_template["tool_use"]
                if "default" in self.chat_template:
                    return self.chat_template["default"]
                raise ValueError("This model has multiple chat templates with no default specified! Pass the name "
                                 f"of one of {sorted(self.chat_template)} as chat_template")
            return chat_template
        if chat_template is None:
            if self.chat_template is None:
                raise ValueError("Cannot use chat template functions because tokenizer.chat_template is not set "
                                 "and no template argument was passed!")
            return self.chat_template
        return chat_template

    def apply_chat_template(self, conversation: list[dict], tools: list | None = None, documents: list | None = None,
                            chat_template: str | None = None, add_generation_prompt: bool = False,
                            tokenize: bool = True, **kwargs: Any) -> str | list[int]:
        """The rendered text (tokenize=False), or its token ids encoded without adding special tokens."""
        for unsupported in ("continue_final_message", "return_assistant_tokens_mask", "sanitize_control_tokens"):
            if kwargs.pop(unsupported, False):
                raise NotImplementedError(f"{unsupported} is not supported by shardserve's tokenizer")
        for ignored in ("padding", "truncation", "max_length", "return_tensors", "return_dict", "tokenizer_kwargs"):
            kwargs.pop(ignored, None)
        template = self.get_chat_template(chat_template, tools)
        text = render_chat(template, conversation, add_generation_prompt, self.special_tokens_map, tools=tools,
                           documents=documents, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __repr__(self) -> str:
        return f"FastTokenizer(name_or_path={self.name_or_path!r}, vocab={len(self)})"


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization (WordPiece-era spacing fixes; never applied to BPE output)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text
