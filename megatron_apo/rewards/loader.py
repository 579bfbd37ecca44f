"""Load a user's reward function from `path/to/file.py:fn_name` (or `package.module:fn_name`)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable

from megatron_apo.config import InputError, MissingInputError

VERL_ARGS = ("data_source", "solution_str", "ground_truth", "extra_info")


def load_reward_fn(spec: str) -> Callable[..., float]:
    """A callable with verl's custom-reward signature `fn(data_source, solution_str, ground_truth, extra_info)`."""
    if ":" not in spec:
        raise InputError(f"reward function {spec!r} must be 'path/to/file.py:fn_name' or 'package.module:fn_name'")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise MissingInputError(f"reward function file not found: {path} (from {spec!r})")
        # A stable, unique module name so repeated loads (and worker processes) agree.
        mod_name = f"_megatron_apo_reward_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
        module = sys.modules.get(mod_name)
        if module is None:
            file_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[mod_name] = module
            try:
                file_spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[mod_name]
                raise InputError(f"reward function file {path} failed to import: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise InputError(f"reward function module {where!r} cannot be imported ({e}); from {spec!r}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise InputError(f"reward function {name!r} not found in {where} (callables there: {found})")
    try:
        inspect.signature(fn).bind(**{a: None for a in VERL_ARGS})
    except TypeError as e:
        raise InputError(f"reward function {spec!r} must accept keyword arguments {VERL_ARGS}: {e}") from e
    except ValueError:  # builtins without a signature: trust them
        pass
    return fn
