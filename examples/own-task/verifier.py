"""The verifier of the example task: did the model convert the unit correctly?

`configs/own-task.yaml` names it as `examples/own-task/verifier.py:score` (a path relative to the
directory you run `rlsd` from). rlsd loads this file in the trainer (to check it imports) and
again in each verifier worker process, so keep module-level code cheap and free of side effects.

What a verifier receives, as rlsd calls it (`fn(prompts, completions, **columns)`):

- `prompts`: a list of one `str`, the student's user message: `data.prompt_template` filled in
  with the record (by default the record's `prompt`, a newline, then "End your reply with a final
  line of the form 'Answer: <answer>'."). It is never the chat-template text: no system prompt,
  no role markers (the same in training, evaluation and `rlsd check-reward`).
- `completions`: a list of one `str`, the model's reply as plain text (special tokens removed).
- `answer`: a list of one `str`, the record's answer. It is always a string: the JSON number
  `3000` arrives as "3000", `0.5` as "0.5".
- `solution`: a list of one `str`, the record's `solution` ("" when the record has none).
- `metadata`: a list of one `dict`, every other field of the record with its JSON type kept
  (here `{"units": ["m", "metre", ...]}`). Extra fields come only inside `metadata`, never as
  keyword arguments of their own.

rlsd calls the verifier once per completion, so every list holds exactly one item; the code below
still loops over them, so the same function works where a batch is passed (TRL, say).

Return one score per completion: 1.0 counts as correct (`reward/accuracy`), anything lower as
not. Return None when the completion cannot be judged at all (here: the record's answer is not a
number, a fault of the data, not of the model); None is counted in `reward/unjudged` and scores
`reward.none_value`. An exception is counted in `reward/errors` and also scores
`reward.none_value`: fix it, do not rely on it.
"""

import math
import re

MARKER = "Answer:"  # the prompt template asks for a final "Answer: <answer>" line
# a number (commas as thousands separators, optional sign and decimals), then maybe a unit
ANSWER = re.compile(r"(?P<number>[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+)\s*(?P<unit>[^\d\s]*)")


def score(prompts, completions, answer, metadata, **columns):
    """1.0 for the right number (and, when a unit is written, one of the record's `units`);
    0.0 for a wrong number, a wrong unit or no "Answer:" line; None for an answer not a number."""
    return [
        score_one(completion, reference, record.get("units", []))
        for completion, reference, record in zip(completions, answer, metadata)
    ]


def score_one(completion: str, reference: str, units: list[str]) -> float | None:
    try:
        expected = float(reference)  # the reference is always a string, even for JSON numbers
    except ValueError:
        return None  # the data's fault: nothing the model wrote can be judged against it
    if MARKER not in completion:
        return 0.0  # no final answer line: the format the prompt asked for is part of the task
    after = completion.rsplit(MARKER, 1)[1].strip()
    line = after.splitlines()[0] if after else ""
    found = ANSWER.match(line.replace("**", "").strip())  # "**3000 m**" is fine
    if found is None:
        return 0.0  # "Answer: three thousand", "Answer: ?"
    unit = found["unit"].rstrip(".").lower()
    if unit and unit not in {u.lower() for u in units}:
        return 0.0  # the right number in the wrong unit ("3 km" for metres) is wrong
    value = float(found["number"].replace(",", ""))
    return 1.0 if math.isclose(value, expected, rel_tol=1e-6, abs_tol=1e-9) else 0.0
