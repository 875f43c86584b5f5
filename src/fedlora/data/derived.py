"""Generation tasks *derived* from a shipped table, with exact references (no hub download).

No instruction or QA data set installs offline from a package registry here under a licence
that allows use, so the built-in generation task is made from the German Credit table fedlora
already ships (UCI Statlog, CC BY 4.0). Every reference is computed from the record by a fixed
rule, so exact match is meaningful. The three task families (field `task`) differ in what the
answer is, which makes them usable as task clusters (`partition.scheme=column`,
`partition.column=task`: each client holds one family):

- `lookup`: "What is the <field>?" -> that field's value, verbatim;
- `summary`: structured-to-text with one fixed template
  ("A 67-year-old applicant asks for 1169 DM over 6 months for radio/television.");
- `extract`: three named fields, in a fixed order, joined by "; ".

Record i belongs to family i mod 3, and a lookup asks for field (i // 3) mod 5, so the task is a
pure function of the table (no randomness). These are synthetic tasks; docs/data.md says so.
"""

from __future__ import annotations

from importlib import resources

import pandas as pd

SHOWN = ("duration_in_month", "credit_amount", "purpose", "age_in_years", "housing", "job",
         "savings_account_and_bonds", "personal_status_and_sex", "foreign_worker")
"""The fields written into every prompt (9 of 20, so prompts stay around 100 tokens)."""
LOOKUP = ("purpose", "housing", "job", "savings_account_and_bonds", "personal_status_and_sex")
EXTRACT = ("housing", "job", "savings_account_and_bonds")


def _spoken(name: str) -> str:
    return name.replace("_", " ")


def _record_text(row: pd.Series) -> str:
    return " ".join(f"{_spoken(c)} is {row[c]}." for c in SHOWN)


def _question_and_answer(i: int, row: pd.Series) -> tuple[str, str, str]:
    family = ("lookup", "summary", "extract")[i % 3]
    if family == "lookup":
        field = LOOKUP[(i // 3) % len(LOOKUP)]
        return family, f"What is the {_spoken(field)}? Answer with the value only.", str(row[field])
    if family == "summary":
        answer = (f"A {row['age_in_years']}-year-old applicant asks for {row['credit_amount']} DM over "
                  f"{row['duration_in_month']} months for {row['purpose']}.")
        return family, "Write one sentence that summarises the loan request.", answer
    names = "; ".join(_spoken(c) for c in EXTRACT)
    return (family, f"List these fields in this order, separated by semicolons: {names}.",
            "; ".join(str(row[c]) for c in EXTRACT))


def read_german_credit() -> pd.DataFrame:
    """The shipped German Credit CSV (data/tables.py's built-in reads it through this, too)."""
    with resources.files("fedlora.data").joinpath("builtin/german_credit.csv").open("r", encoding="utf-8") as fh:
        return pd.read_csv(fh)


def german_credit_qa() -> pd.DataFrame:
    """1000 records (one per applicant): _chat, prompt, response, task, _line (the CSV line)."""
    records = []
    for i, row in read_german_credit().iterrows():
        family, question, answer = _question_and_answer(int(i), row)
        prompt = f"Loan application: {_record_text(row)}\n{question}"
        records.append({"_chat": [{"role": "user", "content": prompt}], "prompt": prompt, "response": answer,
                        "task": family, "_line": int(i) + 2})
    return pd.DataFrame(records)


DERIVED = {
    "german-credit-qa": dict(
        records=german_credit_qa, target="task", domain="finance",
        source="derived from UCI Statlog (German Credit Data), Hofmann 1994 (fedlora's shipped CSV): "
        "lookup, summary and extract questions with rule-made references",
        license="CC BY 4.0 (data)",
    ),
}
"""Built-in generation tasks (data.task=generation, data.source=NAME)."""


def derived_key(source: str) -> str | None:
    key = source.strip().lower().replace("_", "-")
    return key if key in DERIVED else None
