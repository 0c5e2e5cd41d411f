"""The code's layout holds what docs/ARCHITECTURE.md promises: the library (pruning/, models/,
engine.py) never reaches up into the command line, scripts build from train/ rather than from
main.py, and no file or function outgrows a reader."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for p in REPO.rglob('*.py')
                 if p.relative_to(REPO).parts[0] not in ('tests', '.venv', '.git'))
LIBRARY = [p for p in SOURCES if p.relative_to(REPO).parts[0] in ('pruning', 'models')
           or p.name == 'engine.py']
COMMAND_LINE = ('main', 'train', 'run_with_submitit')


def rel(path):
    return str(path.relative_to(REPO))


def imports(path):
    """(module, names) of every import in a file, relative imports resolved to their top level."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            top = path.relative_to(REPO).parts[0] if node.level else None
            yield (node.module or '') if not node.level else f'{top}.{node.module or ""}', \
                tuple(a.name for a in node.names)


def test_the_sources_are_found():
    names = {rel(p) for p in SOURCES}
    assert {'main.py', 'engine.py', 'train/trainer.py', 'pruning/pruner.py', 'models/deploy.py'} <= names
    assert len(LIBRARY) >= 10


@pytest.mark.parametrize('path', LIBRARY, ids=rel)
def test_the_library_never_imports_the_command_line(path):
    up = [m for m, _ in imports(path) if m.split('.')[0] in COMMAND_LINE]
    assert not up, f'{rel(path)} imports {up}'


@pytest.mark.parametrize('path', LIBRARY, ids=rel)
def test_the_library_never_reads_args(path):
    reads = [n.lineno for n in ast.walk(ast.parse(path.read_text()))
             if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == 'args']
    assert not reads, f'{rel(path)} reads args on lines {reads}'


@pytest.mark.parametrize('path', [p for p in SOURCES if rel(p).startswith(('scripts/', 'train/'))], ids=rel)
def test_scripts_and_train_take_only_the_flags_from_main(path):
    for module, names in imports(path):
        if module == 'main':
            assert names == ('get_args_parser',), f'{rel(path)} imports {names} from main'


SCRIPT_FILES = sorted((REPO / 'scripts').glob('*.py'))
# a script is a file run as a program; the others (common.py, fresh_process.py, ...) are modules
SCRIPTS = {p.stem for p in SCRIPT_FILES if "if __name__ == '__main__':" in p.read_text()}


@pytest.mark.parametrize('path', SCRIPT_FILES, ids=rel)
def test_no_script_imports_another_script(path):
    """What scripts share lives in modules that say so, not in another script."""
    assert {'common', 'fresh_process'}.isdisjoint(SCRIPTS) and len(SCRIPTS) >= 10
    others = [m for m, _ in imports(path) if m.split('.')[0] in SCRIPTS - {path.stem}]
    assert not others, f'{rel(path)} imports the scripts {others}'


@pytest.mark.parametrize('path', SOURCES, ids=rel)
def test_no_file_is_over_500_lines(path):
    assert len(path.read_text().splitlines()) <= 500


def is_parser_builder(name):
    return name == 'get_args_parser' or (name.startswith('add_') and name.endswith('flags'))


@pytest.mark.parametrize('path', SOURCES, ids=rel)
def test_no_function_is_over_60_lines(path):
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 60 and not is_parser_builder(n.name)]
    assert not long, f'{rel(path)}: {long}'
