"""The module boundaries the renovation settled: checked on the source tree."""

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("cxr_tf", "pipeline", "serving", "benchmarks")


def _sources():
    for package in PACKAGES:
        yield from sorted((REPO / package).rglob("*.py"))


def _our_module_aliases(tree):
    """Names bound to modules of this project by the file's imports."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PACKAGES:
                    aliases[a.asname or a.name.split(".")[0]] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PACKAGES:
                for a in node.names:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    return aliases


def test_no_module_imports_another_modules_private_name():
    offences = []
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        own = ".".join(path.relative_to(REPO).with_suffix("").parts)
        aliases = _our_module_aliases(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module.split(".")[0] not in PACKAGES:
                    continue
                for a in node.names:
                    if not a.name.startswith("_") or a.name.startswith("__"):
                        continue
                    # A package's private helper module (layers/_cam_head.py,
                    # data/_phantom.py) serves the modules of its own
                    # package: that is what the underscore says.
                    helper = REPO.joinpath(*node.module.split("."), f"{a.name}.py")
                    if helper.is_file() and helper.parent == path.parent:
                        continue
                    offences.append(f"{path.name}: from {node.module} import {a.name}")
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and aliases[node.value.id] != own
            ):
                offences.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not offences, offences


def test_client_does_not_import_the_exporter():
    tree = ast.parse((REPO / "serving" / "client.py").read_text(encoding="utf-8"))
    imported = set(_our_module_aliases(tree).values())
    assert not any("export_lib" in name for name in imported), imported
