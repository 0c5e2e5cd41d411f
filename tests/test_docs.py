"""The documentation holds together: README.md stays one screen per task (at most 200 lines),
and every relative link of README.md and docs/*.md names a file that exists and, with a
`#anchor`, a heading of that markdown file, slugged as GitHub slugs it."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / 'README.md'] + sorted((REPO / 'docs').glob('*.md'))
README_MAX_LINES = 200

FENCE = re.compile(r'^\s*(```|~~~)')
INLINE_CODE = re.compile(r'(`+)(.+?)\1')
# [text](target) and ![alt](target), with an optional "title"; the text holds no ']'
LINK = re.compile(r'!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
HEADING = re.compile(r'^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$')
SCHEME = re.compile(r'^[a-zA-Z][a-zA-Z0-9+.-]*:')


def prose_lines(text):
    """The lines outside fenced code blocks, as (line number, line)."""
    inside = False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            yield number, line


def slug(heading):
    """GitHub's anchor of a heading: its text without markup, lowercased, every character but
    letters, digits, '_', '-' and spaces removed (letters of any script kept), spaces to '-'."""
    text = INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', text)  # a link keeps its text
    text = re.sub(r'(\*{1,3})(\S(?:.*?\S)?)\1', r'\2', text)  # emphasis; '_' inside a word stays
    text = re.sub(r'(?<!\w)(_{1,3})(\S(?:.*?\S)?)\1(?!\w)', r'\2', text)
    text = re.sub(r'<[^>]+>', '', text)
    return re.sub(r'[^\w\- ]', '', text.strip().lower()).replace(' ', '-')


def anchors(path):
    """Every heading's anchor in a markdown file; a repeated one gets -1, -2, … as on GitHub."""
    seen, result = {}, set()
    for _, line in prose_lines(path.read_text(encoding='utf-8')):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f'{base}-{count}')
    return result


def relative_links(path):
    """(line number, target) of every link that is not a URL, outside code."""
    for number, line in prose_lines(path.read_text(encoding='utf-8')):
        for m in LINK.finditer(INLINE_CODE.sub('CODE', line)):
            target = m.group(1)
            if not SCHEME.match(target):
                yield number, target


def test_slug_follows_githubs_rules():
    assert slug("Reproduce the paper's table") == 'reproduce-the-papers-table'
    assert slug('A cheaper ΔΨ (`--bpi-mode fast`)') == 'a-cheaper-δψ---bpi-mode-fast'
    assert slug('10. Where this implementation departs from the authors\' code, and why') == \
        '10-where-this-implementation-departs-from-the-authors-code-and-why'
    assert slug('On a cluster (SLURM)') == 'on-a-cluster-slurm'
    assert slug('DeiT (III)\'s other_flags') == 'deit-iiis-other_flags'
    assert slug('**Bold** and [a link](x.md)') == 'bold-and-a-link'
    assert slug('`gpu_check_runs.py` and _this_') == 'gpu_check_runspy-and-this'


def test_readme_fits_in_200_lines():
    lines = (REPO / 'README.md').read_text(encoding='utf-8').splitlines()
    assert len(lines) <= README_MAX_LINES, f'README.md has {len(lines)} lines, at most {README_MAX_LINES}'


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_names_a_file_and_a_heading(doc):
    broken = []
    for number, target in relative_links(doc):
        file_part, _, anchor = target.partition('#')
        linked = (doc.parent / file_part).resolve() if file_part else doc
        where = f'{doc.relative_to(REPO)}:{number}: {target}'
        if not linked.is_file():
            broken.append(f'{where} (no such file)')
        elif anchor and linked.suffix != '.md':
            broken.append(f'{where} (an anchor into a file that is not markdown)')
        elif anchor and anchor not in anchors(linked):
            broken.append(f'{where} (no heading #{anchor} in {linked.relative_to(REPO)})')
    assert not broken, '\n'.join(broken)


def test_the_docs_have_links_to_check():
    """The link test sees the links (a regex that matched nothing would pass every file)."""
    assert (REPO / 'docs').is_dir() and len(DOCS) > 1
    targets = [t for _, t in relative_links(REPO / 'README.md')]
    assert 'docs/USAGE.md' in targets and any('#' in t for t in targets)
