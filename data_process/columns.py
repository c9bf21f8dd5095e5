"""Which fields of a user row feed which canonical field: the --columns mapping and the built-in presets.

A `Spec` names, for each canonical slot, the source field(s) it is read from; the slots it fills decide the
dataset the row goes to:

    text                                    -> pretrain   {text}
    messages (+ system)                     -> sft        {messages}
    prompt + response (+ system, history)   -> sft        {messages}
    chosen + rejected (+ prompt)            -> preference {prompt, chosen, rejected}
    prompt                                  -> prompts    {prompt}

Several fields in one slot (`prompt=title+desc`) are joined with a newline; the first must exist, later ones
may be missing or empty. Field names, message keys and role names match case-insensitively. Without a
mapping, a file's first row picks the preset whose signature fields it holds (the most specific one, so
wikiextractor's {id, url, title, text} is plain `text`); a row that fits no preset, or two unrelated ones, is
a UserError naming the fields found and --columns, never a guess.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from utils.errors import UserError

SLOTS = ("text", "prompt", "response", "system", "history", "messages", "chosen", "rejected")
KEY_OPTIONS = ("role_key", "content_key")
ROLE_OPTIONS = {"user_role": "user", "assistant_role": "assistant", "system_role": "system"}
# ShareGPT's human/gpt next to the OpenAI names; a mapping adds its own names to these
DEFAULT_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
SPEC_SUFFIXES = (".json", ".yaml", ".yml")
OPTIONAL_SLOTS = ("system", "history")  # may be missing or empty in any row; every other mapped field must exist
# (kind, required slots, optional slots): the shapes a mapping may take, first match wins
SHAPES = (
    ("sft", {"messages"}, {"system"}),
    ("preference", {"chosen", "rejected"}, {"prompt"}),
    ("sft", {"prompt", "response"}, {"system", "history"}),
    ("pretrain", {"text"}, set()),
    ("prompts", {"prompt"}, set()),
)
SHAPES_HELP = ("text | messages(+system) | prompt+response(+system,history) | chosen+rejected(+prompt) | "
               "prompt")


def _shape(fields: dict[str, tuple[str, ...]], source: str) -> str:
    """The kind of a mapping, or a UserError naming the slots that do not fit together."""
    slots = set(fields)
    for kind, required, optional in SHAPES:
        if required <= slots <= required | optional:
            return kind
    raise UserError(f"{source}: slots {', '.join(sorted(slots)) or 'none'} do not make a dataset row; use one "
                    f"of: {SHAPES_HELP}")


def lowered(row: dict[str, Any], where: str) -> dict[str, Any]:
    """The row with lower-case field names (fields match case-insensitively)."""
    low = {str(k).lower(): v for k, v in row.items()}
    if len(low) < len(row):
        seen: dict[str, str] = {}
        for k in map(str, row):
            if k.lower() in seen:
                raise UserError(f"{where}: fields {seen[k.lower()]!r} and {k!r} differ only in case; field "
                                "names match case-insensitively, so rename one of them")
            seen[k.lower()] = k
    return low


def _as_text(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: field {name!r} must be a string, got {type(value).__name__} "
                        f"{json.dumps(value, ensure_ascii=False, default=str)[:60]}")
    return value


@dataclass
class Spec:
    """How one input's rows map to a canonical dataset row.

    `fields`: slot -> source field names (lower case; several are joined with a newline). `signature`: the
    fields whose presence selects a preset (default: the first field of each slot but system and history). `role_key` /
    `content_key`: the keys of a conversation's messages ('' = role/content or ShareGPT's from/value,
    whichever a message has). `roles`: source role name (lower case) -> user, assistant or system.
    """

    name: str
    fields: dict[str, tuple[str, ...]]
    signature: frozenset[str] = frozenset()
    role_key: str = ""
    content_key: str = ""
    roles: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ROLES))
    kind: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.kind = _shape(self.fields, self.name)
        self.signature = self.signature or frozenset(names[0] for slot, names in self.fields.items()
                                                      if slot not in OPTIONAL_SLOTS)

    def columns(self) -> str:
        """The mapping as a --columns value."""
        return ",".join(f"{slot}={'+'.join(names)}" for slot, names in self.fields.items())

    # -- reading fields ----------------------------------------------------------------------------------

    def _missing(self, name: str, row: dict[str, Any], where: str) -> UserError:
        return UserError(f"{where}: missing field {name!r} (found: {', '.join(sorted(map(str, row))) or 'none'}); "
                         f"this file's first row made it a {self.kind} file ({self.name}), so every row needs "
                         "the same fields")

    def _raw(self, slot: str, row: dict[str, Any], low: dict[str, Any], where: str) -> Any:
        """The value of a one-field slot; None when the slot is unmapped; a UserError when it is missing."""
        names = self.fields.get(slot)
        if not names:
            return None
        if low.get(names[0]) is None:
            raise self._missing(names[0], row, where)
        return low[names[0]]

    def _text(self, slot: str, row: dict[str, Any], low: dict[str, Any], where: str,
              required: bool = True) -> str:
        """A string slot: its fields joined with a newline (empty later fields skipped); '' when an optional
        slot is unmapped or empty."""
        names = self.fields.get(slot)
        if not names:
            return ""
        value = low.get(names[0])
        if value is None or value == "":
            if not required:
                return ""
            if value is None:
                raise self._missing(names[0], row, where)
        parts = [_as_text(value, where, names[0])]
        if len(names) == 1:
            return parts[0]
        parts += [_as_text(low[name], where, name) for name in names[1:] if low.get(name) not in (None, "")]
        return "\n".join(p for p in parts if p)

    def _message(self, msg: Any, where: str, name: str) -> dict[str, str]:
        if not isinstance(msg, dict):
            raise UserError(f"{where}: {name} must be an object with a role and a content, got "
                            f"{type(msg).__name__}")
        m = lowered(msg, where)
        role_key = self.role_key or ("role" if "role" in m or "from" not in m else "from")
        content_key = self.content_key or ("content" if "content" in m or "value" not in m else "value")
        if role_key not in m or content_key not in m:
            raise UserError(f"{where}: {name} must be an object with {role_key!r} and {content_key!r} (found: "
                            f"{', '.join(sorted(map(str, msg)))}); name its keys with --columns "
                            "role_key=...,content_key=...")
        raw = m[role_key]
        role = self.roles.get(str(raw).lower())
        if role is None:
            raise UserError(f"{where}: {name}.{role_key}={raw!r} is not a known role ({', '.join(self.roles)}); "
                            f"map it with --columns user_role={raw} or assistant_role={raw}")
        return {"role": role, "content": _as_text(m[content_key], where, f"{name}.{content_key}")}

    def _conversation(self, value: Any, where: str, name: str) -> list[dict[str, str]]:
        if not isinstance(value, list) or not value:
            raise UserError(f"{where}: field {name!r} must be a non-empty list of "
                            "{\"role\": ..., \"content\": ...} objects")
        return [self._message(m, where, f"{name}[{i}]") for i, m in enumerate(value)]

    def _history(self, row: dict[str, Any], low: dict[str, Any], where: str) -> list[dict[str, str]]:
        """Alpaca/ChatGLM history [[question, answer], ...] as alternating user/assistant messages."""
        names = self.fields.get("history")
        value = low.get(names[0]) if names else None
        if not value:
            return []
        turns = []
        for i, pair in enumerate(value if isinstance(value, list) else [value]):
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                raise UserError(f"{where}: field {names[0]!r} must be a list of [question, answer] pairs, got "
                                f"{json.dumps(value, ensure_ascii=False, default=str)[:60]}")
            turns += [{"role": "user", "content": _as_text(pair[0], where, f"{names[0]}[{i}][0]")},
                      {"role": "assistant", "content": _as_text(pair[1], where, f"{names[0]}[{i}][1]")}]
        return turns

    # -- canonical rows ----------------------------------------------------------------------------------

    def apply(self, row: Any, where: str) -> dict[str, Any]:
        """The row in its dataset's canonical columns, or a UserError naming the field and the fix."""
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected an object with named fields, got {type(row).__name__}")
        low = lowered(row, where)
        if self.kind == "pretrain":
            return {"text": self._text("text", row, low, where)}
        if self.kind == "prompts":
            return {"prompt": self._prompt(self._raw("prompt", row, low, where), where)}
        if self.kind == "preference":
            return self._preference(row, low, where)
        system = self._text("system", row, low, where, required=False)
        messages = [{"role": "system", "content": system}] if system else []
        if "messages" in self.fields:
            messages += self._conversation(self._raw("messages", row, low, where), where, self.fields["messages"][0])
        else:
            messages += [*self._history(row, low, where),
                         {"role": "user", "content": self._text("prompt", row, low, where)},
                         {"role": "assistant", "content": self._text("response", row, low, where)}]
        if messages[-1]["role"] != "assistant":
            raise UserError(f"{where}: the last message must be the assistant's answer (role 'assistant')")
        return {"messages": messages}

    def _prompt(self, value: Any, where: str) -> str:
        """A prompt string, or the last user turn of a prompt given as messages (the canonical prompt is one
        user turn: earlier turns and the system message are dropped)."""
        if isinstance(value, str):
            return value
        users = [m["content"] for m in self._conversation(value, where, "prompt") if m["role"] == "user"]
        if not users:
            raise UserError(f"{where}: field 'prompt' holds no user message")
        return users[-1]

    def _reply(self, value: Any, where: str, name: str) -> str:
        """A reply string, or the one assistant message of a reply given as messages."""
        if isinstance(value, str):
            return value
        messages = self._conversation(value, where, name) if value else []
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise UserError(f"{where}: {name} must be one assistant reply after the prompt, got "
                            f"{len(messages)} message(s) with roles {[m['role'] for m in messages]}")
        return messages[0]["content"]

    def _preference(self, row: dict[str, Any], low: dict[str, Any], where: str) -> dict[str, str]:
        chosen, rejected = self._raw("chosen", row, low, where), self._raw("rejected", row, low, where)
        if "prompt" in self.fields:
            prompt = self._raw("prompt", row, low, where)
        elif isinstance(chosen, list) and isinstance(rejected, list):
            # implicit prompt: two whole conversations; the shared opening is the prompt
            c, r = (self._conversation(v, where, n) for v, n in ((chosen, "chosen"), (rejected, "rejected")))
            n = 0
            while n < min(len(c), len(r)) and c[n] == r[n]:
                n += 1
            prompt, chosen, rejected = c[:n], c[n:], r[n:]
            if not prompt:
                raise UserError(f"{where}: 'chosen' and 'rejected' share no opening messages, so there is no "
                                "prompt; give it with --columns prompt=FIELD,chosen=...,rejected=...")
        else:
            raise UserError(f"{where}: 'chosen' and 'rejected' are plain text and there is no prompt field "
                            f"(found: {', '.join(sorted(map(str, row)))}); name it with --columns "
                            "prompt=FIELD,chosen=...,rejected=...")
        return {"prompt": self._prompt(prompt, where), "chosen": self._reply(chosen, where, "chosen"),
                "rejected": self._reply(rejected, where, "rejected")}


def _preset(name: str, signature: tuple[str, ...] = (), **fields: str) -> Spec:
    return Spec(name, {slot: tuple(v.split("+")) for slot, v in fields.items()}, frozenset(signature))


# Built-in presets, picked by signature; docs/DATA.md has a table of them.
PRESETS = (
    _preset("text", text="text"),
    _preset("prompt", prompt="prompt"),
    _preset("prompt/response", prompt="prompt", response="response", system="system", history="history"),
    _preset("alpaca", prompt="instruction+input", response="output", system="system", history="history"),
    _preset("zhihu_kol", prompt="instruction+input", response="response"),
    _preset("openai messages", messages="messages", system="system"),
    _preset("sharegpt", messages="conversations", system="system"),
    _preset("preference", prompt="prompt", chosen="chosen", rejected="rejected"),
    _preset("preference (implicit prompt)", chosen="chosen", rejected="rejected"),
    _preset("webtext2019zh", ("qid", "title", "content", "answer_id"), prompt="title+desc", response="content"),
    _preset("baike_qa2019", ("qid", "category", "title", "answer"), prompt="title+desc", response="answer"),
    _preset("medical dialogue", ("ask", "answer"), prompt="ask", response="answer"),
)


def detect(row: Any, where: str) -> Spec:
    """The preset a row's fields select: among the presets whose signature the row holds, the one whose
    signature includes every other's; a UserError when none fits or two unrelated ones do."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with named fields ({SHAPES_HELP}), got {type(row).__name__}")
    keys = set(lowered(row, where))
    matched = [p for p in PRESETS if p.signature <= keys]
    best = [p for p in matched if not any(p.signature < q.signature for q in matched)]
    if len(best) == 1:
        return best[0]
    found = ", ".join(sorted(map(str, row))) or "none"
    if not best:
        raise UserError(f"{where}: no known fields (found: {found}); map them with --columns, e.g. --columns "
                        f"prompt=FIELD,response=FIELD (shapes: {SHAPES_HELP}; presets: docs/DATA.md)")
    options = "; ".join(f"{p.name} -> {p.kind} ({p.columns()})" for p in best)
    raise UserError(f"{where}: the fields fit more than one format (found: {found}): {options}; pick one with "
                    f"--columns, e.g. --columns {best[0].columns()}")


def _spec_file(path: str) -> dict[str, Any]:
    """The mapping in a .json/.yaml spec file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--columns {path}: spec file not found; give an existing .json/.yaml file or "
                        "slot=field pairs")
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except Exception as err:  # json, yaml and decoding raise different types; all mean a malformed file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--columns {path}: not a valid {p.suffix.lstrip('.').upper()} file ({first[:120]})") from None
    if not isinstance(data, dict):
        raise UserError(f"--columns {path}: expected a mapping of slot: field, e.g. {{\"prompt\": \"question\"}}")
    return data


def _names(value: Any, source: str, key: str) -> tuple[str, ...]:
    """Field or role names of one mapping entry: 'a+b' or a list, lower-cased."""
    items = value.split("+") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items or not all(isinstance(i, str) and i.strip() for i in items):
        raise UserError(f"{source}: {key}={value!r} must name a field (several joined with + or as a list)")
    return tuple(i.strip().lower() for i in items)


def is_spec_file(entry: str) -> bool:
    """Whether a --columns entry names a spec file rather than slot=field pairs."""
    return "=" not in entry and Path(entry.strip()).suffix.lower() in SPEC_SUFFIXES


def parse_columns(entry: str) -> Spec | None:
    """A --columns entry as a Spec: 'auto' (None: presets), slot=field[+field],... pairs, or a spec file."""
    entry = entry.strip()
    if entry in ("", "auto"):
        return None
    source = f"--columns {entry}"
    if is_spec_file(entry):
        mapping = _spec_file(entry)
    else:
        mapping = {}
        for item in entry.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip() or not value.strip():
                raise UserError(f"{source}: {item.strip()!r} is not slot=field; write e.g. --columns "
                                "prompt=question,response=answer (or 'auto', or a .json/.yaml spec file)")
            mapping[key.strip()] = value.strip()
    fields, roles, keys = {}, dict(DEFAULT_ROLES), {}
    for key, value in mapping.items():
        slot = str(key).lower()
        if slot in SLOTS:
            fields[slot] = _names(value, source, key)
        elif slot in KEY_OPTIONS:
            keys[slot] = _names(value, source, key)[0]
        elif slot in ROLE_OPTIONS:
            roles.update({name: ROLE_OPTIONS[slot] for name in _names(value, source, key)})
        else:
            raise UserError(f"{source}: unknown slot {key!r}; use {', '.join(SLOTS)}, "
                            f"{', '.join(KEY_OPTIONS)} or {', '.join(ROLE_OPTIONS)}")
    return Spec(source, fields, role_key=keys.get("role_key", ""), content_key=keys.get("content_key", ""),
                roles=roles)


def input_specs(inputs: list[str], columns: list[str]) -> list[Spec | None]:
    """One Spec (None: presets) per --input: --columns gives one entry for all inputs or one per input."""
    if columns and not inputs:
        raise UserError("--columns maps the fields of --input files; give --input too (or drop --columns)")
    if len(columns) not in (0, 1, len(inputs)):
        raise UserError(f"--columns has {len(columns)} entries for {len(inputs)} --input paths; give one for "
                        "every input, or one per input in the same order ('auto' keeps the presets)")
    specs = [parse_columns(c) for c in columns] or [None]
    return specs * len(inputs) if len(specs) == 1 else specs
