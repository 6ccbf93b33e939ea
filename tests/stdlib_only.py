#!/usr/bin/env python3
"""Print every import in the given files that is not in the standard library; exit 1 if there is one.
The same check as the project's stdlib rule, kept here so the suite needs nothing outside the repo."""
import ast
import sys


def outside_stdlib(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, n) for n in names
                  if n.split(".")[0] not in sys.stdlib_module_names and n.split(".")[0] != "__future__"]
    return found


if __name__ == "__main__":
    bad = [f"{p}:{line}: imports {name}" for p in sys.argv[1:] for line, name in outside_stdlib(p)]
    print("\n".join(bad)) if bad else None
    sys.exit(1 if bad else 0)
