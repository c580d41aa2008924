"""Plain-text tables: the one formatter behind task=summary, task=gradcheck and scripts/compare_runs.py."""


def format_table(header, rows, right=(), footer=None) -> str:
    """`rows` (sequences of cells; str() applied) under `header`, each column padded to its widest cell,
    two spaces between columns and a rule of dashes under each header cell; the columns whose index is
    in `right` are right-aligned (numbers). `footer`, a row, goes below a second rule. Trailing spaces
    are trimmed."""
    header = [str(cell) for cell in header]
    body = [[str(cell) for cell in row] for row in rows]
    every = [header, *body, *([[str(cell) for cell in footer]] if footer else [])]
    widths = [max(len(row[i]) for row in every) for i in range(len(header))]

    def line(row):
        return "  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                         for i, (cell, w) in enumerate(zip(row, widths))).rstrip()

    rule = line(["-" * w for w in widths])
    lines = [line(header), rule, *map(line, body)]
    if footer:
        lines += [rule, line(every[-1])]
    return "\n".join(lines)
