"""Load `policies/*.yaml` into a PolicySet and decide, per recipient, the Settings for a message.

Files are read in file-name order (`*.yaml` and `*.yml`; names starting with `.` are
skipped, subdirectories such as `templates/` too), rules in list order. Every rule that
matches applies, and a later rule's `set` overrides an earlier one key by key; keys a
rule does not name keep their value. `null` sets a key back to its default.

A rule::

    - name: sales signature          # required, unique across all files
      match: {sender: ["*@sales.example.com"]}   # see gateway.policy.rules; none = everything
      set: {signature: templates/sales.html}

Settable keys and their defaults (from the config):

| key | type | default |
| --- | --- | --- |
| `track_opens`, `track_clicks` | bool | `tracking.opens`, `tracking.clicks` |
| `skip_links` | list of URL globs | none; a later rule's list replaces the earlier one |
| `skip_links_add` | list of URL globs | adds to `skip_links` instead of replacing it |
| `signature`, `disclaimer` | template path or null | none (see gateway.policy.templates) |
| `dkim` | bool | on when `dkim:` has a key for the sender's domain or a parent of it |
| `route` | account, smarthost, mx | `delivery.route` |
| `max_per_day` | int >= 1 or null | no cap (counted per sender address, checked at RCPT) |
| `store` | bool | on (record the message in the CRM store) |
| `suppressed` | record, refuse | record (delivered, marked); refuse: 550 5.1.1 at RCPT |

Validation gathers every problem of every file (file, line, key) into one
ConfigError. `policies_for(cfg)` applies the directory rule: a missing `policies_dir`
means no rules when the key is left at its default, and is an error when the config
sets it explicitly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from gateway.config import (
    Config,
    load_yaml_with_nodes,
    node_location,
    validation_problems,
)
from gateway.errors import ConfigError, Problem
from gateway.policy.rules import (
    Context,
    Headers,
    Matcher,
    is_literal,
    nearest_domain,
    url_skipped,
)
from gateway.policy.templates import Template, load_template

Route = Literal["account", "smarthost", "mx"]
Suppressed = Literal["record", "refuse"]
_At = Callable[[Sequence[int | str], str], Problem]

SETTING_KEYS = ("track_opens", "track_clicks", "skip_links", "signature", "disclaimer",
                "dkim", "route", "max_per_day", "store", "suppressed")
MATCH_KEYS = ("sender", "sender_domain", "recipient", "recipient_domain", "user", "account",
              "header", "not")

# ----------------------------------------------------------------------------------
# the file format (pydantic, frozen, unknown keys are errors)


def _as_list(v: Any) -> Any:
    return [v] if isinstance(v, str | dict) else v


def _nonempty_list(v: tuple[str, ...]) -> tuple[str, ...]:
    if not v:
        raise ValueError("an empty list matches nothing; remove the key to match everything")
    return v


def _glob(v: str) -> str:
    v = v.strip()
    if not v:
        raise ValueError("an empty pattern")
    return v


def _nonblank(v: str) -> str:
    v = v.strip()
    if not v:
        raise ValueError("must not be empty")
    return v


def _domain_glob(v: str) -> str:
    v = _glob(v).rstrip(".")
    if "@" in v:
        raise ValueError(f"{v!r} is an address; a domain key takes a domain such as "
                         "example.com or *.example.com")
    return v


def _header_name(v: str) -> str:
    v = v.strip()
    if not re.fullmatch(r"[!-9;-~]+", v):
        raise ValueError(f"{v!r} is not a header field name (e.g. X-Campaign)")
    return v


Glob = Annotated[str, AfterValidator(_glob)]
DomainGlob = Annotated[str, AfterValidator(_domain_glob)]
Globs = Annotated[tuple[Glob, ...], BeforeValidator(_as_list), AfterValidator(_nonempty_list)]
DomainGlobs = Annotated[tuple[DomainGlob, ...], BeforeValidator(_as_list),
                        AfterValidator(_nonempty_list)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


_M = TypeVar("_M", bound=_Model)


class HeaderMatch(_Model):
    name: Annotated[str, AfterValidator(_header_name)]
    value: Glob = "*"


def _header_list(v: Any) -> Any:
    v = _as_list(v)
    if isinstance(v, list) and not v:
        raise ValueError("an empty list matches nothing; remove the key to match everything")
    return v


class Match(_Model):
    sender: Globs | None = None
    sender_domain: DomainGlobs | None = None
    recipient: Globs | None = None
    recipient_domain: DomainGlobs | None = None
    user: Globs | None = None
    account: Globs | None = None
    header: Annotated[tuple[HeaderMatch, ...], BeforeValidator(_header_list)] | None = None
    not_: Match | None = Field(default=None, alias="not")

    def compile(self) -> Matcher:
        globs = {k: getattr(self, k) for k in ("sender", "sender_domain", "recipient",
                                               "recipient_domain", "user", "account")
                 if getattr(self, k) is not None}
        headers = [(h.name, h.value) for h in self.header or ()]
        return Matcher(globs, headers, self.not_.compile() if self.not_ is not None else None)


class SetBlock(_Model):
    track_opens: bool | None = None
    track_clicks: bool | None = None
    skip_links: Annotated[tuple[Glob, ...], BeforeValidator(_as_list)] | None = None
    skip_links_add: Annotated[tuple[Glob, ...], BeforeValidator(_as_list)] | None = None
    signature: Annotated[str, AfterValidator(_nonblank)] | None = None
    disclaimer: Annotated[str, AfterValidator(_nonblank)] | None = None
    dkim: bool | None = None
    route: Route | None = None
    max_per_day: Annotated[int, Field(strict=True, ge=1)] | None = None
    store: bool | None = None
    suppressed: Suppressed | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> SetBlock:
        if not self.model_fields_set:
            raise ValueError("needs at least one key (" + ", ".join(SETTING_KEYS) + ")")
        return self


# ----------------------------------------------------------------------------------
# results


@dataclass(frozen=True, slots=True)
class Source:
    """Where a setting's value comes from: a rule (name, file, line) or a default."""

    rule: str | None = None
    file: str | None = None
    line: int | None = None
    default: str | None = None

    def __str__(self) -> str:
        if self.rule is None:
            return f"default ({self.default})"
        return f"rule {self.rule!r} ({self.file}:{self.line})"

    def to_json(self) -> dict[str, Any]:
        if self.rule is None:
            return {"default": self.default}
        return {"rule": self.rule, "file": self.file, "line": self.line}


@dataclass(frozen=True, slots=True)
class Settings:
    """The resolved per-recipient settings; the pipeline and delivery act on these only."""

    track_opens: bool
    track_clicks: bool
    skip_links: tuple[str, ...]
    signature: Template | None
    disclaimer: Template | None
    dkim: bool
    route: Route
    max_per_day: int | None
    store: bool
    suppressed: Suppressed = "record"

    def skip_link(self, url: str) -> bool:
        """True when `url` matches a `skip_links` glob: the link stage leaves it alone."""
        return url_skipped(url, self.skip_links)

    @property
    def tracking(self) -> bool:
        """Whether this recipient needs its own copy (opens or clicks are tracked)."""
        return self.track_opens or self.track_clicks

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in SETTING_KEYS:
            v = getattr(self, k)
            out[k] = v.name if isinstance(v, Template) else list(v) if isinstance(v, tuple) else v
        return out


@dataclass(frozen=True, slots=True)
class Decision:
    """The settings for one recipient, where each came from, and the rules that matched."""

    settings: Settings
    sources: Mapping[str, tuple[Source, ...]]   # per key; several only for skip_links_add
    matched: tuple[Source, ...]

    def source(self, key: str) -> Source:
        """The rule (or default) that decided `key` last."""
        return self.sources[key][-1]

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings.to_json(),
            "sources": {k: [s.to_json() for s in self.sources[k]] for k in SETTING_KEYS},
            "matched": [s.to_json() for s in self.matched],
        }


@dataclass(frozen=True, slots=True)
class Rule:
    """A validated, compiled rule."""

    name: str
    source: Source
    matcher: Matcher
    values: tuple[tuple[str, Any], ...]   # (key, value) in SETTING_KEYS; None = default
    skip_links_add: tuple[str, ...]


_DEFAULT_TEXT = {
    "track_opens": "config tracking.opens",
    "track_clicks": "config tracking.clicks",
    "skip_links": "none",
    "signature": "none",
    "disclaimer": "none",
    "route": "config delivery.route",
    "max_per_day": "no cap",
    "store": "on",
    "suppressed": "record",
}


class PolicySet:
    """The loaded rules and templates for one Config; `decide()` is pure and fast."""

    def __init__(self, cfg: Config, rules: Sequence[Rule] = (), files: Sequence[Path] = (),
                 directory: Path | None = None,
                 templates: Mapping[str, Template] | None = None) -> None:
        self.cfg = cfg
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.files: tuple[Path, ...] = tuple(files)
        self.directory = directory
        self.templates: Mapping[str, Template] = MappingProxyType(dict(templates or {}))
        self.uses_headers = any(r.matcher.uses_headers for r in self.rules)
        #: whether any rule sets a daily cap (only then are sends counted)
        self.has_daily_caps = any(k == "max_per_day" and v is not None
                                  for r in self.rules for k, v in r.values)
        self._dkim_domains = frozenset(d.lower().rstrip(".") for d in cfg.dkim)
        self._memo: dict[tuple[tuple[int, ...], bool], Decision] = {}

    @classmethod
    def empty(cls, cfg: Config) -> PolicySet:
        return cls(cfg)

    def decide(self, sender: str, recipient: str, user: str | None = None,
               account: str | None = None,
               headers: Headers | Iterable[tuple[str, str]] | None = None) -> Decision:
        """The Settings for mail from `sender` to one `recipient`.

        `user` is the SMTP AUTH login (None for a trusted network), `account` that user's
        account id. Pass `headers` after DATA (a Headers, or (name, value) pairs); before
        DATA (at RCPT) pass None and `header` matches are false. Decisions are cached by
        the set of rules that matched, so a call costs the matching only.
        """
        if headers is not None and not isinstance(headers, Headers):
            headers = Headers.from_pairs(headers) if self.uses_headers else None
        ctx = Context.make(sender, recipient, user, account, headers)
        matched = tuple(i for i, r in enumerate(self.rules) if r.matcher(ctx))
        key = (matched, nearest_domain(ctx.sender_domain, self._dkim_domains) is not None)
        d = self._memo.get(key)
        if d is None:
            if len(self._memo) >= 4096:
                self._memo.clear()
            d = self._memo[key] = self._build(matched, key[1])
        return d

    def _defaults(self, dkim_default: bool) -> dict[str, Any]:
        c = self.cfg
        return {"track_opens": c.tracking.opens, "track_clicks": c.tracking.clicks,
                "skip_links": (), "signature": None, "disclaimer": None, "dkim": dkim_default,
                "route": c.delivery.route, "max_per_day": None, "store": True,
                "suppressed": "record"}

    def _build(self, matched: tuple[int, ...], dkim_default: bool) -> Decision:
        # A Decision is shared by every sender with the same matched rules and dkim default,
        # so nothing in it may name the sender.
        defaults = self._defaults(dkim_default)
        values = dict(defaults)
        dkim_text = ("config dkim: has a key for the sender's domain" if dkim_default
                     else "config dkim: no key for the sender's domain")
        sources: dict[str, tuple[Source, ...]] = {
            k: (Source(default=_DEFAULT_TEXT.get(k, dkim_text)),) for k in SETTING_KEYS}
        for i in matched:
            rule = self.rules[i]
            for k, v in rule.values:
                values[k] = defaults[k] if v is None else v
                sources[k] = (rule.source,)
            if rule.skip_links_add:
                values["skip_links"] = tuple(values["skip_links"]) + rule.skip_links_add
                sources["skip_links"] = (*sources["skip_links"], rule.source)
        settings = Settings(**values)
        return Decision(settings, MappingProxyType(sources),
                        tuple(self.rules[i].source for i in matched))

    def __len__(self) -> int:
        return len(self.rules)


# ----------------------------------------------------------------------------------
# loading


def _unknown_key_message(key: str) -> str:
    tail = key.rsplit(".", 1)[-1] if "." in key else key
    parent = key.rsplit(".", 2)[-2] if key.count(".") >= 1 else ""
    if parent == "set":
        allowed = ", ".join((*SETTING_KEYS, "skip_links_add"))
    elif parent in ("match", "not"):
        allowed = ", ".join(MATCH_KEYS)
    elif parent == "header" or re.search(r"header\[\d+\]$", parent):
        allowed = "name, value"
    else:
        allowed = "name, match, set"
    return f"unknown key {tail!r} (allowed here: {allowed})"


def _policy_files(directory: Path) -> list[Path]:
    return sorted((p for p in directory.iterdir()
                   if p.suffix in (".yaml", ".yml") and not p.name.startswith(".")
                   and p.is_file()), key=lambda p: p.name)


def _user_exists(cfg: Config, pattern: str) -> bool:
    return not is_literal(pattern) or cfg.user(pattern) is not None


def _account_exists(cfg: Config, pattern: str) -> bool:
    return not is_literal(pattern) or any(a.id.lower() == pattern.lower() for a in cfg.accounts)


def _semantic(m: Match | None, s: SetBlock | None, cfg: Config, at: _At) -> Iterator[Problem]:
    """Checks against the config: references and settings that cannot work."""
    if m is not None:
        for i, u in enumerate(m.user or ()):
            if not _user_exists(cfg, u):
                yield at(("match", "user", i), f"no user with login {u!r} in the config's users:")
        for i, a in enumerate(m.account or ()):
            if not _account_exists(cfg, a):
                yield at(("match", "account", i),
                         f"no account with id {a!r} in the config's accounts:")
    if s is None:
        return
    if s.route == "smarthost" and cfg.delivery.smarthost is None:
        yield at(("set", "route"), "route: smarthost but the config has no delivery.smarthost")
    if s.route == "account" and not any(a.smtp_endpoint() for a in cfg.accounts):
        yield at(("set", "route"),
                 "route: account but no account in the config has an SMTP upstream")
    if s.dkim is True and not cfg.dkim:
        yield at(("set", "dkim"), "dkim: true but the config has no dkim: keys")
    if s.max_per_day is not None and m is not None and m.compile().uses_headers:
        yield at(("set", "max_per_day"), "max_per_day cannot depend on a header match: the cap "
                 "is checked at RCPT, before the headers are known")
    if s.suppressed is not None and m is not None and m.compile().uses_headers:
        yield at(("set", "suppressed"), "suppressed cannot depend on a header match: the "
                 "suppression list is checked at RCPT, before the headers are known")


class _Loader:
    """Validation state across all files: rule names seen, templates loaded, problems."""

    def __init__(self, directory: Path, cfg: Config) -> None:
        self.directory = directory
        self.cfg = cfg
        self.problems: list[Problem] = []
        self.rules: list[Rule] = []
        self.names: dict[str, Source] = {}
        self.templates: dict[str, tuple[Template | None, str | None]] = {}

    def _validate(self, model: type[_M], data: Any, file: str, node: yaml.Node | None,
                  prefix: tuple[int | str, ...]) -> _M | None:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            for p in validation_problems(file, exc, node, prefix=prefix):
                if p.message.startswith("unknown key"):
                    p = Problem(p.file, p.line, p.key, _unknown_key_message(p.key))
                self.problems.append(p)
            return None

    def _template(self, name: str) -> tuple[Template | None, str | None]:
        if name not in self.templates:
            tpl, err, inside = load_template(name, self.directory)
            self.templates[name] = (tpl, err)
            self.problems += inside  # problems inside a template file: reported once
        return self.templates[name]

    def file(self, path: Path) -> None:
        file = str(path)
        try:
            data, node = load_yaml_with_nodes(path)
        except ConfigError as exc:
            self.problems += exc.problems
            return
        if data is None or (data == {} and node is None):
            return  # an empty file (or comments only) holds no rules
        if not isinstance(data, list):
            self.problems.append(Problem(file, node.start_mark.line + 1 if node else 1, "",
                                         "a policy file is a list of rules "
                                         "(- name: ..., match: ..., set: ...)"))
            return
        for i, item in enumerate(data):
            self.rule(file, node, i, item)

    def rule(self, file: str, node: yaml.Node | None, i: int, item: Any) -> None:
        def at(loc: Sequence[int | str], message: str) -> Problem:
            line, key = node_location(node, (i, *loc))
            return Problem(file, line, key, message)

        if not isinstance(item, dict):
            self.problems.append(at((), "a rule is a mapping with name, match and set"))
            return
        before = len(self.problems)
        for k in item:
            if k not in ("name", "match", "set"):
                self.problems.append(at((str(k),), _unknown_key_message(f"[{i}].{k}")))
        name = item.get("name")
        source: Source | None = None
        if isinstance(name, bool | int | float):
            self.problems.append(at(("name",), f"YAML reads this name as {name}; quote it"))
        elif not isinstance(name, str) or not name.strip():
            self.problems.append(at(("name",) if "name" in item else (),
                                    "every rule needs a name: (a non-empty string)"))
        else:
            name = name.strip()
            source = Source(name, file, at(("name",), "").line)
            if name in self.names:
                first = self.names[name]
                self.problems.append(at(("name",), f"duplicate rule name {name!r} "
                                        f"(first at {first.file}:{first.line})"))
            else:
                self.names[name] = source
        match = self._validate(Match, item.get("match") or {}, file, node, (i, "match"))
        if "set" not in item:
            self.problems.append(at((), "every rule needs a set: (the settings it decides)"))
            settings = None
        elif isinstance(item["set"], dict) and item["set"]:
            # key by key, so that the valid keys are still checked (templates, route, ...)
            valid = {k: v for k, v in item["set"].items()
                     if self._validate(SetBlock, {k: v}, file, node, (i, "set")) is not None}
            settings = SetBlock.model_validate(valid) if valid else None
        else:
            settings = self._validate(SetBlock, item["set"], file, node, (i, "set"))
        self.problems += _semantic(match, settings, self.cfg, at)
        values: list[tuple[str, Any]] = []
        template_ok = True
        if settings is not None:
            for key in SETTING_KEYS:
                if key not in settings.model_fields_set:
                    continue
                value = getattr(settings, key)
                if key in ("signature", "disclaimer") and value is not None:
                    tpl, err = self._template(value)
                    if err is not None:
                        self.problems.append(at(("set", key), err))
                    template_ok = template_ok and tpl is not None
                    value = tpl
                values.append((key, value))
        if (len(self.problems) > before or not template_ok or source is None or match is None
                or settings is None):
            return
        self.rules.append(Rule(source.rule or "", source, match.compile(), tuple(values),
                               settings.skip_links_add or ()))


def load_policies(directory: Path, cfg: Config) -> PolicySet:
    """Read and validate every policy file in `directory`; raise ConfigError with every problem.

    A directory that does not exist is an error here; see `policies_for` for the
    config's rule about a missing default directory.
    """
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise ConfigError([Problem(str(directory), None, "", f"policies directory {what}")])
    try:
        files = _policy_files(directory)
    except OSError as exc:
        raise ConfigError([Problem(str(directory), None, "",
                                   f"cannot list: {exc.strerror or exc}")]) from None
    loader = _Loader(directory, cfg)
    for path in files:
        loader.file(path)
    if loader.problems:
        raise ConfigError(sorted(loader.problems, key=lambda p: (p.file, p.line or 0)))
    templates = {name: tpl for name, (tpl, _) in loader.templates.items() if tpl is not None}
    return PolicySet(cfg, loader.rules, files, directory, templates)


def policies_for(cfg: Config) -> PolicySet:
    """The PolicySet of `cfg.policies_dir` (relative to the config file).

    A missing directory means no rules when `policies_dir` is left at its default; when
    the config sets it explicitly, a missing directory is a problem at that key.
    """
    directory = cfg.path(cfg.policies_dir)
    if not directory.exists() and "policies_dir" not in cfg.model_fields_set:
        return PolicySet(cfg, directory=None)
    if not directory.is_dir():
        line = None
        if cfg.source != "<memory>":
            try:
                _, node = load_yaml_with_nodes(Path(cfg.source))
                line, _ = node_location(node, ("policies_dir",))
            except ConfigError:
                pass
        what = "is not a directory" if directory.exists() else "does not exist"
        raise ConfigError([Problem(cfg.source, line, "policies_dir",
                                   f"{directory} {what} (remove the key to run without policies)")])
    return load_policies(directory, cfg)
