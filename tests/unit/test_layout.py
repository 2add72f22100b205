"""The house rules that can be counted: modules of at most 400 lines, functions of at most 60, no
import circle among the project's modules and no import from a wing above a module's own (lazy imports
inside functions included), at most 20 entries at the top of ``mpo/``, and each of the project's file
names written as a literal in one module only (the others import its constant); and the Sphinx-style
references of the package's docstrings and comments to ``mpo.*`` and ``reward.*`` name what exists."""

from __future__ import annotations

import ast
import importlib
import re
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for package in ("mpo", "reward") for p in sorted((REPO / package).rglob("*.py"))}


def _tree(path: Path) -> ast.AST:
    return ast.parse(path.read_text(encoding="utf-8"))


def test_modules_are_at_most_400_lines():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in MODULES.items()}
    assert {name: n for name, n in sizes.items() if n > 400} == {}


def test_functions_are_at_most_60_lines():
    long = [(name, node.name, node.end_lineno - node.lineno + 1) for name, path in MODULES.items()
            for node in ast.walk(_tree(path)) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 60]
    assert long == []


def _imports(path: Path) -> set[str]:
    """The project's modules ``path`` imports; ``from pkg import sub`` counts as an import of ``pkg.sub``
    when ``sub`` is a module."""
    found = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        else:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        found.update(n for n in names if n in MODULES)
    return found


def test_no_import_circles():
    graph = {name: _imports(path) - {name} for name, path in MODULES.items()}
    circles, done = [], set()

    def visit(name, trail):
        if name in trail:
            circles.append(trail[trail.index(name):] + [name])
            return
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, trail + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert circles == []


# Lowest first; a module may import from its own layer or a lower one. The foundation is every module
# not in a wing below: the flat mpo/*.py, mpo/config, mpo/data. mpo/eval (held-out evaluation) sits
# above the reward model it may score with and below the round driver that may run it; mpo/grpo (GRPO's
# rewards and sample buffer) above the reward model and the evaluation rules its rewards use.
LAYERS = ("mpo.rollout", "mpo.train", "reward", "mpo.eval", "mpo.grpo", "mpo.rounds", "mpo.cli")


def _layer(name: str) -> int:
    if name == "mpo.__main__":
        return LAYERS.index("mpo.cli") + 1
    wings = [i + 1 for i, wing in enumerate(LAYERS) if name == wing or name.startswith(wing + ".")]
    return wings[0] if wings else 0


def test_foundation_is_what_is_named():
    assert {name.split(".")[1] for name in MODULES if _layer(name) == 0 and name.count(".") > 1} \
        == {"config", "data"}


def test_no_module_imports_from_a_wing_above_its_own():
    upward = sorted((name, target) for name, path in MODULES.items() for target in _imports(path)
                    if _layer(target) > _layer(name))
    assert upward == []


def test_mpo_has_at_most_20_entries():
    entries = sorted(p.name for p in (REPO / "mpo").iterdir() if p.name != "__pycache__")
    assert len(entries) <= 20, entries


# The project's own files (not a model's config.json or tokenizer files): each name is a literal in one
# module, which owns the file; the others import that module's constant.
FILE_NAMES = ("value_head.safetensors", "metrics.jsonl", "manifest.json", "pair_stats.json",
              "rollouts.jsonl", "scored.jsonl", "pairs.jsonl", "mpo_state.json", "run_key.json",
              ".mpo-digests.json", ".key.json", ".mpo.lock", "done.json", "ref_logps.jsonl",
              "data_report.json", "config.yaml", "layout.json", ".parts", "summary.json",
              "pair_scores.jsonl", "wandb_id.txt", ".tmp", "launcher.log", "stderr.log", "sweep.csv",
              "scores.jsonl", "results.json")


def _strings(tree: ast.AST) -> list[str]:
    """Every string constant in ``tree`` but docstrings (an f-string's literal parts included)."""
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs]


def _mentions(text: str, file_name: str) -> bool:
    """``file_name`` within a longer text (a message, a path, a help line); a name that begins with a
    dot (``.key.json``) also as the end of another (``pairs.key.json``)."""
    before = "" if file_name.startswith(".") else r"(?<![\w.-])"
    return re.search(before + re.escape(file_name) + r"(?![\w-]|\.\w)", text) is not None


def test_file_names_are_defined_once():
    holders = defaultdict(set)
    for name, path in MODULES.items():
        for text in _strings(_tree(path)):
            for file_name in FILE_NAMES:
                if _mentions(text, file_name):
                    holders[file_name].add(name)
    twice = {file_name: sorted(names) for file_name, names in holders.items() if len(names) > 1}
    for file_name, names in sorted(twice.items()):
        print(f"{file_name}: {', '.join(names)}")
    assert twice == {}
    assert set(holders) == set(FILE_NAMES), "a name no module holds: drop it from FILE_NAMES"


REFERENCE = re.compile(r":(?:mod|func|class|meth|attr|data|exc):`~?((?:mpo|reward)(?:\.\w+)*)`")


def _exists(dotted: str) -> bool:
    """``dotted`` is a module of the project, or a name (a dataclass field too) reached from one."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        if module in MODULES:
            if module.endswith("__main__"):  # importing it would run the command
                return i == len(parts)
            target = importlib.import_module(module)
            for part in parts[i:]:
                fields = getattr(target, "__dataclass_fields__", {})
                if not hasattr(target, part):
                    return part in fields and part == parts[-1]
                target = getattr(target, part)
            return True
    return False


def test_docstring_references_name_what_exists():
    references = {(name, match) for name, path in MODULES.items()
                  for match in REFERENCE.findall(path.read_text(encoding="utf-8"))}
    assert len(references) > 50  # the pattern still finds them
    assert sorted((name, ref) for name, ref in references if not _exists(ref)) == []


def test_test_file_names_are_unique():
    """The test folders are not packages: two test files of one name stop pytest's collection."""
    names = [p.name for p in (REPO / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []


def test_no_test_folder_shadows_an_installed_package():
    """tests/ is on sys.path under pytest: a folder named like a package (tests/vllm once) is found as
    that package, and libraries that probe for it (TRL's is_vllm_available) then fail to import."""
    from importlib.metadata import packages_distributions

    folders = {p.name for p in (REPO / "tests").iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    assert sorted(folders & {*packages_distributions(), "vllm", "deepspeed", "flash_attn", "peft"}) == []
