"""Imports a command-line script (absl flags at module level) into a test.

Scripts such as `benchmarks/reproduce.py` define their flags when imported,
on absl's one global `FLAGS`. Two scripts that share a flag name (`seed`,
`image_size`) then cannot both be imported in one pytest process, and which
one fails depends on test order. `load` gives the script a private
`FlagValues`, parsed with the defaults, so each script sees only its own
flags and the global namespace is left as it was.
"""

import builtins
import functools
import importlib.util
import types

from absl import flags as real_flags


def _private_flags_module(private):
    proxy = types.ModuleType("absl.flags")
    proxy.__dict__.update(real_flags.__dict__)
    for name, function in real_flags.__dict__.items():
        if name.startswith(("DEFINE", "declare_", "mark_", "register_")):
            proxy.__dict__[name] = functools.partial(function, flag_values=private)
    proxy.FLAGS = private
    return proxy


def load(path, name):
    """Returns the module at `path`; its flags live on `module.flags.FLAGS`."""
    private = real_flags.FlagValues()
    flags_proxy = _private_flags_module(private)

    def script_import(module_name, globals_=None, locals_=None, fromlist=(), level=0):
        # Only the script's own `from absl import flags` is redirected; the
        # modules it imports keep the real global namespace.
        imported = builtins.__import__(module_name, globals_, locals_, fromlist, level)
        if module_name == "absl" and fromlist and "flags" in fromlist:
            absl_proxy = types.ModuleType("absl")
            absl_proxy.__dict__.update(imported.__dict__)
            absl_proxy.flags = flags_proxy
            return absl_proxy
        return imported

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    module.__dict__["__builtins__"] = dict(builtins.__dict__, __import__=script_import)
    spec.loader.exec_module(module)
    private.mark_as_parsed()
    return module
