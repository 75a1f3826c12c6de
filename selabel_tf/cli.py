"""What the `bin/` programs share: flags generated from a config dataclass, help, one-line errors.

A config dataclass declares each option once, as a field with metadata {"help", "choices", "group"}
(see `train.option`); `define_flags` makes the absl flag of each field (enums for fields with choices,
lists for tuples), `config_from_flags` builds the dataclass back. `parse_or_exit` parses argv before
absl's `app.run` (so that a bad flag exits 2 with one line, no traceback), and answers --help / -h /
--helpfull with every flag and its help, grouped, on stdout, exit 0.

Nothing here reads the global `absl.flags.FLAGS`: the programs pass their `FlagValues`.
"""

import dataclasses
import sys
import typing
from typing import Dict, List, Optional, Sequence

from absl import flags

HELP_ARGS = ("--help", "-h", "--helpfull", "-help", "--helpshort")


def _base_type(annotation):
  """int for Optional[int], (tuple, int) for Tuple[int, ...], else the annotation."""
  origin = typing.get_origin(annotation)
  if origin is typing.Union:
    return _base_type(next(a for a in typing.get_args(annotation) if a is not type(None)))
  if origin is tuple:
    return (tuple, typing.get_args(annotation)[0])
  return annotation


def define_flags(config_class, flag_values: flags.FlagValues, *, only: Optional[Sequence[str]] = None,
                 unset_default: bool = False) -> List[str]:
  """Defines one flag per field of `config_class` (or of the fields `only`), with its help, choices and
  default; `unset_default` makes every default None ("not given": e.g. keep a stored config's value).
  Returns the names."""
  defaults = config_class()
  names = []
  for field in dataclasses.fields(config_class):
    if only is not None and field.name not in only:
      continue
    default = None if unset_default else getattr(defaults, field.name)
    help_text = field.metadata.get("help", field.name)
    choices = field.metadata.get("choices")
    kind = _base_type(field.type)
    common = dict(name=field.name, default=default, help=help_text, flag_values=flag_values)
    if choices:
      flags.DEFINE_enum(enum_values=list(choices), **common)
    elif kind is bool:
      flags.DEFINE_bool(**common)
    elif kind is int:
      flags.DEFINE_integer(**common)
    elif kind is float:
      flags.DEFINE_float(**common)
    elif isinstance(kind, tuple):
      flags.DEFINE_list(**{**common, "default": None if default is None else [str(v) for v in default]})
    else:
      flags.DEFINE_string(**common)
    names.append(field.name)
  return names


def values_from_flags(config_class, flag_values: flags.FlagValues, names: Optional[Sequence[str]] = None,
                      *, skip_unset: bool = False) -> Dict[str, object]:
  """The parsed values of the flags of `config_class`'s fields (or of `names`), a list flag's entries
  converted to the field's type; `skip_unset` leaves out flags whose value is None.

  Raises:
    ValueError: a list entry that is not of its type, naming the flag.
  """
  fields = {field.name: field for field in dataclasses.fields(config_class)}
  values = {}
  for name in (names if names is not None else fields):
    if name not in flag_values:
      continue
    value = flag_values[name].value
    if value is None and skip_unset:
      continue
    kind = _base_type(fields[name].type)
    if isinstance(kind, tuple) and value is not None:
      try:
        value = tuple(kind[1](v) for v in value)
      except ValueError:
        raise ValueError(f"--{name}={','.join(value)} must be a comma list of "
                         f"{kind[1].__name__} values") from None
    values[name] = value
  return values


def config_from_flags(config_class, flag_values: flags.FlagValues):
  """The `config_class` of the parsed flags (see `values_from_flags`)."""
  return config_class(**values_from_flags(config_class, flag_values))


def help_text(program: str, doc: str, config_class, flag_values: flags.FlagValues,
              extra: Optional[Dict[str, Sequence[str]]] = None,
              fields: Optional[Sequence[str]] = None) -> str:
  """Usage, the program's docstring, then every flag with its help and default, grouped: the flags of
  `config_class`'s fields (or of `fields`) by their group, then the `extra` groups of other flags."""
  groups: Dict[str, List[str]] = {}
  for field in dataclasses.fields(config_class):
    if field.name in flag_values and (fields is None or field.name in fields):
      groups.setdefault(field.metadata.get("group", "options"), []).append(field.name)
  for group, names in (extra or {}).items():
    groups.setdefault(group, []).extend(names)
  lines = [f"usage: {program} [--flagfile=FILE] [--flag=value ...]", "", doc.strip(), ""]
  for group, names in groups.items():
    lines.append(f"{group}:")
    for name in names:
      flag = flag_values[name]
      default = flag.default_as_str if flag.default is not None else "unset"
      lines.append(f"  --{name}: {flag.help} (default: {default})")
    lines.append("")
  return "\n".join(lines)


def fail(program: str, message: str):
  """The one-line error of a bad input: `<program>: error: <message>` on stderr, exit 2."""
  print(f"{program}: error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_or_exit(program: str, doc: str, config_class, flag_values: flags.FlagValues,
                  argv: Sequence[str], extra_groups=None, fields: Optional[Sequence[str]] = None):
  """Parses argv into `flag_values`: help (exit 0, see `help_text`) or a one-line error (exit 2) instead
  of absl's."""
  if any(arg in HELP_ARGS for arg in argv[1:]):
    print(help_text(program, doc, config_class, flag_values, extra_groups, fields))
    sys.exit(0)
  try:
    return flag_values(argv)
  except flags.Error as e:
    fail(program, str(e).splitlines()[0])
