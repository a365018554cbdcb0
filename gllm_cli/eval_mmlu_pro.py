"""`gllm eval mmlu-pro`: MMLU-Pro accuracy under TIGER-Lab's chain-of-thought protocol, in-process or against --url.

The protocol (TIGER-Lab/MMLU-Pro, evaluate_from_local.py): each test question is preceded by the
first k validation questions of its category with their worked answers; options are lettered A-J
with the "N/A" padding dropped; the prompt ends in "Answer: Let's think step by step."; decoding
is greedy and stops at "Question:". The answer is the first match of `answer is \\(?([A-J])\\)?`,
else the last "answer: X" of the first line that has one, else the last standalone letter A-J.
Shots are dropped from the end until the prompt and --max-tokens fit the context. Unlike
TIGER-Lab, a reply without an answer counts as wrong instead of as a random guess, and the
number of them is reported.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gllm_cli.errors import friendly_errors
from gllm_cli.options import ModelOrServedArgument, with_engine_options
from gllm_cli.remote import auth_headers, checked, served_model

if TYPE_CHECKING:
    from gllm_engine.entrypoints.async_llm import AsyncLLM

LETTERS = "ABCDEFGHIJ"
DATA_SUFFIXES = (".parquet", ".json", ".jsonl")
# The protocol's instruction (cot_prompt_lib/initial_prompt.txt), with the category for {subject}.
INSTRUCTION = ("You are an expert in {subject}. Below is a series of example questions (with answers) about "
               "{subject} for demonstration. You will be given a question at the end, after the examples, for you "
               "to answer. First give step-by-step reasoning about how to solve the question. Then output the answer.")
COT_START = "Answer: Let's think step by step."
STOP = ["Question:"]
# The protocol's extraction, in order: (how the answer was found, pattern).
EXTRACTORS = (("answer is", re.compile(r"answer is \(?([A-J])\)?")),
              ("answer:", re.compile(r".*[aA]nswer:\s*([A-J])")),
              ("last letter", re.compile(r"\b([A-J])\b(?!.*\b[A-J]\b)", re.DOTALL)))
BAD_LINES_SHOWN = 10


# ---- data -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Question:
    question_id: int
    category: str
    question: str
    options: tuple[str, ...]  # without the "N/A" padding
    answer: str  # the gold letter
    cot_content: str  # the worked answer (validation split), "" in the test split


@dataclass
class Split:
    questions: list[Question]
    bad: list[tuple[str, str]]  # (where, why) of each record that was skipped


def _plain(value: Any) -> Any:
    """numpy arrays and scalars (pandas' parquet rows) as Python lists and numbers; anything else as is."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def parse_question(record: Any) -> Question:
    """A Question from one MMLU-Pro record; ValueError naming the first field that is wrong."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    record = {k: _plain(v) for k, v in record.items()}
    qid = record.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, int):
        raise ValueError("'question_id' must be an integer")
    for name in ("question", "category"):
        if not isinstance(record.get(name), str) or not record[name].strip():
            raise ValueError(f"'{name}' must be a non-empty string")
    options = record.get("options")
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise ValueError("'options' must be a list of strings")
    options = [o for o in options if o != "N/A"]
    if not 1 <= len(options) <= len(LETTERS):
        raise ValueError(f"'options' must hold 1 to {len(LETTERS)} options besides N/A, got {len(options)}")
    answer, index = record.get("answer"), record.get("answer_index")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(LETTERS)):
        raise ValueError(f"'answer_index' must be an integer in [0, {len(LETTERS)})")
    if answer is None and index is not None:
        answer = LETTERS[index]
    if not isinstance(answer, str) or answer not in LETTERS[: len(options)]:
        raise ValueError(f"'answer' must be one of the option letters {LETTERS[0]}-{LETTERS[len(options) - 1]}")
    if index is not None and LETTERS[index] != answer:
        raise ValueError(f"'answer' {answer} and 'answer_index' {index} disagree")
    cot = record.get("cot_content")
    if cot is not None and not isinstance(cot, str):
        raise ValueError("'cot_content' must be a string")
    return Question(qid, record["category"], record["question"], tuple(options), answer, cot or "")


def _json_lines(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path}:{number}", ValueError(f"not JSON ({e.msg})")


def _parquet_rows(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        return pq.read_table(path).to_pylist()
    try:
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    except ImportError:
        raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or give the data as "
                         f"JSON/JSONL") from None


def read_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for each record of a parquet, JSON-array or JSON-lines file; an unreadable line's
    record is the ValueError saying why."""
    if path.suffix == ".parquet":
        for i, row in enumerate(_parquet_rows(path), start=1):
            yield f"{path}: row {i}", row
        return
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a valid JSON array ({e.msg} at line {e.lineno})") from None
        for i, record in enumerate(records, start=1):
            yield f"{path}: record {i}", record
        return
    yield from _json_lines(path, text)  # .jsonl, and .json written as lines (as HF datasets' to_json does)


def read_split(paths: list[Path]) -> Split:
    """The questions of the files in `paths`, in order; malformed records are listed and skipped."""
    questions, bad = [], []
    for path in paths:
        for where, record in read_records(path):
            try:
                if isinstance(record, ValueError):
                    raise record
                questions.append(parse_question(record))
            except ValueError as e:
                bad.append((where, str(e)))
    return Split(questions, bad)


def split_files(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(test files, validation files) of --data paths: a directory gives its data files (recursively); a file
    whose name starts with "val" (validation-00000-of-00001.parquet, val.jsonl) is validation, any other test."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
            if not found:
                raise ValueError(f"--data {path}: no {', '.join(DATA_SUFFIXES)} file inside")
            files += found
        elif path.is_file():
            if path.suffix not in DATA_SUFFIXES:
                raise ValueError(f"--data {path}: expected a {', '.join(DATA_SUFFIXES)} file")
            files.append(path)
        else:
            raise ValueError(f"--data {path}: no such file or directory")
    validation = [f for f in files if f.name.lower().startswith("val")]
    return [f for f in files if f not in validation], validation


def select(questions: list[Question], subjects: str | None, limit: int | None) -> list[Question]:
    """The questions of the chosen subjects (comma-separated categories; _ for space, any case), at most `limit`
    of each, in file order."""
    norm = lambda name: name.strip().lower().replace("_", " ")
    if subjects:
        available = {norm(q.category) for q in questions}
        wanted = {norm(s) for s in subjects.split(",") if s.strip()}
        unknown = sorted(wanted - available)
        if unknown:
            raise ValueError(f"--subjects: no category {', '.join(unknown)} in the test data; it has "
                             f"{', '.join(sorted(available))}")
        questions = [q for q in questions if norm(q.category) in wanted]
    if limit is not None:
        seen: dict[str, int] = {}
        kept = []
        for q in questions:
            seen[q.category] = seen.get(q.category, 0) + 1
            if seen[q.category] <= limit:
                kept.append(q)
        questions = kept
    return questions


# ---- prompts and answers --------------------------------------------------------------------------
def format_question(q: Question, with_answer: bool) -> str:
    options = "".join(f"{LETTERS[i]}. {opt}\n" for i, opt in enumerate(q.options))
    text = f"Question:\n{q.question}\nOptions:\n{options}"
    if with_answer:
        return text + q.cot_content.replace("A: Let's think step by step.", COT_START) + "\n\n"
    return text + COT_START


def build_prompt(q: Question, shots: list[Question]) -> str:
    """The instruction for `q`'s category, the worked examples, then `q` awaiting its reasoning."""
    return (INSTRUCTION.format(subject=q.category) + "\n\n"
            + "".join(format_question(s, True) for s in shots) + format_question(q, False))


def extract_answer(text: str) -> tuple[str | None, str | None]:
    """(letter, how it was found) by the protocol's patterns in order; (None, None) when none matches."""
    for method, pattern in EXTRACTORS:
        match = pattern.search(text)
        if match:
            return match.group(1), method
    return None, None


# ---- generation -----------------------------------------------------------------------------------
class Generator(Protocol):
    tokenizer: Any  # for fitting shots into the context; None: no fitting
    max_model_len: int | None

    async def complete(self, prompt: str, max_tokens: int) -> str:
        """The greedy continuation of `prompt`, stopped at the protocol's stop string."""


class EngineGenerator:
    """The engine in this process, through `AsyncLLM`."""

    def __init__(self, llm: AsyncLLM):
        self.llm, self.tokenizer, self.max_model_len = llm, llm.tokenizer, llm.max_model_len
        self._num = 0

    async def complete(self, prompt: str, max_tokens: int) -> str:
        from gllm_engine.sampling_params import RequestOutputKind, SamplingParams

        self._num += 1
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=STOP,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        (out,) = [out async for out in self.llm.generate(prompt, params, f"mmlu-pro-{self._num}")]
        return out.outputs[0].text


class ServerGenerator:
    """An OpenAI-compatible server's /completions; open it with `async with` (finds the model unless named)."""

    def __init__(self, url: str, api_key: str | None, model: str | None, tokenizer: Any):
        self.model, self.tokenizer, self.max_model_len = model, tokenizer, None
        self.client = httpx.AsyncClient(base_url=url.rstrip("/"), headers=auth_headers(api_key), timeout=None)

    async def __aenter__(self) -> ServerGenerator:
        listed = await served_model(self.client)
        self.model = self.model or listed["id"]
        self.max_model_len = listed.get("max_model_len")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()

    async def complete(self, prompt: str, max_tokens: int) -> str:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stop": STOP}
        try:
            response = await self.client.post("/completions", json=body)
        except httpx.HTTPError as e:
            raise ValueError(f"{type(e).__name__}: {e}") from None
        return checked(response).json()["choices"][0]["text"]


@dataclass
class Graded:
    question: Question
    num_shots: int
    prompt_sha256: str
    response: str | None = None
    prediction: str | None = None
    extracted_by: str | None = None
    error: str | None = None  # the request failed (counted as wrong)

    @property
    def correct(self) -> bool:
        return self.prediction == self.question.answer


def fit_prompt(q: Question, shots: list[Question], generator: Generator, max_tokens: int
               ) -> tuple[str, int, int]:
    """(prompt, shots used, max tokens) with shots dropped from the end until prompt + max tokens fit the
    context; a prompt that fits no answer at all gets 0 max tokens."""
    prompt = build_prompt(q, shots)
    if generator.tokenizer is None or generator.max_model_len is None:
        return prompt, len(shots), max_tokens
    context = generator.max_model_len
    k = len(shots)
    length = len(generator.tokenizer.encode(prompt))
    while k > 0 and length + max_tokens > context:
        k -= 1
        prompt = build_prompt(q, shots[:k])
        length = len(generator.tokenizer.encode(prompt))
    return prompt, k, max(0, min(max_tokens, context - length))


async def grade(generator: Generator, q: Question, shots: list[Question], max_tokens: int) -> Graded:
    """Ask one question and extract the answer; a failed request is recorded, never raised."""
    prompt, k, budget = fit_prompt(q, shots, generator, max_tokens)
    graded = Graded(q, k, hashlib.sha256(prompt.encode()).hexdigest())
    if budget < 1:
        graded.error = f"the prompt does not fit the {generator.max_model_len}-token context"
        return graded
    try:
        graded.response = await generator.complete(prompt, budget)
    except Exception as e:
        graded.error = str(e) or type(e).__name__
        return graded
    graded.prediction, graded.extracted_by = extract_answer(graded.response)
    return graded


async def evaluate(generator: Generator, questions: list[Question], shots: dict[str, list[Question]],
                   max_tokens: int, concurrency: int, console: Console) -> list[Graded]:
    """Every question, `concurrency` at a time, with a progress bar; results in question order."""
    limit = asyncio.Semaphore(concurrency)
    with Progress(TextColumn("MMLU-Pro"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task("eval", total=len(questions))

        async def one(q: Question) -> Graded:
            async with limit:
                graded = await grade(generator, q, shots.get(q.category, []), max_tokens)
            progress.advance(task)
            return graded

        return list(await asyncio.gather(*(one(q) for q in questions)))


# ---- results --------------------------------------------------------------------------------------
def tally(graded: list[Graded]) -> dict[str, dict[str, Any]]:
    """Per category and "overall" (micro: every question counts once): questions, correct, accuracy, how many
    replies had no answer, how many requests failed."""
    groups: dict[str, list[Graded]] = {}
    for g in graded:
        groups.setdefault(g.question.category, []).append(g)
    counts = {}
    for name, members in [*sorted(groups.items()), ("overall", graded)]:
        correct = sum(g.correct for g in members)
        counts[name] = {"questions": len(members), "correct": correct,
                        "accuracy": correct / len(members) if members else 0.0,
                        "no_answer": sum(g.error is None and g.prediction is None for g in members),
                        "failed": sum(g.error is not None for g in members)}
    return counts


def print_table(console: Console, counts: dict[str, dict[str, Any]], title: str) -> None:
    table = Table(title=title)
    for column in ("category", "questions", "correct", "accuracy", "no answer", "failed"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for name, c in counts.items():
        if name == "overall":
            table.add_section()
        table.add_row(name, str(c["questions"]), str(c["correct"]), f"{c['accuracy']:.2%}", str(c["no_answer"]),
                      str(c["failed"]), style="bold" if name == "overall" else None)
    console.print(table)


def _record(g: Graded) -> dict:
    q = g.question
    return {"question_id": q.question_id, "category": q.category, "prompt_sha256": g.prompt_sha256,
            "num_shots": g.num_shots, "prediction": g.prediction, "gold": q.answer, "correct": g.correct,
            "extracted_by": g.extracted_by, "error": g.error, "response": g.response}


def shot_notes(categories: list[str], shots: dict[str, list[Question]], num_shots: int, has_validation: bool
               ) -> list[str]:
    """What the user is told about the k-shot examples."""
    if num_shots == 0:
        return ["0-shot (--num-shots 0)"]
    if not has_validation:
        return ["0-shot: no validation data given, so no chain-of-thought examples (a file or directory entry "
                "named validation* / val* in --data supplies them)"]
    notes = [f"{num_shots}-shot chain of thought from the validation split"]
    missing = [c for c in categories if not shots.get(c)]
    short = [f"{c} ({len(shots[c])})" for c in categories if 0 < len(shots.get(c, [])) < num_shots]
    if missing:
        notes.append(f"0-shot for categories without validation questions: {', '.join(missing)}")
    if short:
        notes.append(f"fewer shots where the validation split has fewer: {', '.join(short)}")
    return notes


@friendly_errors
@with_engine_options
def mmlu_pro(
    model: ModelOrServedArgument = None,
    data: Annotated[list[Path] | None, typer.Option(
        metavar="PATH", help="MMLU-Pro parquet/JSON/JSONL file or directory (repeatable); files named val* are the "
                             "validation split.")] = None,
    url: Annotated[str | None, typer.Option(help="Evaluate an OpenAI-compatible server, e.g. http://host:8000/v1.")]
    = None,
    api_key: Annotated[str | None, typer.Option(help="API key for --url.")] = None,
    num_shots: Annotated[int, typer.Option(help="Chain-of-thought examples per question, from the validation split.")]
    = 5,
    subjects: Annotated[str | None, typer.Option(help="Comma-separated categories (default: all).")] = None,
    limit: Annotated[int | None, typer.Option(help="Questions per category at most.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Longest reply, in tokens.")] = 2048,
    concurrency: Annotated[int, typer.Option(help="Questions in flight at once.")] = 32,
    output_json: Annotated[Path | None, typer.Option(help="Also write the accuracies and every question's record.")]
    = None,
    *,
    engine_kwargs: dict,
) -> None:
    """MMLU-Pro accuracy per category, TIGER-Lab's chain-of-thought protocol, in-process or against --url.

    With --url, --tokenizer (if given) lets the shots be trimmed to the server's context.
    """
    for flag, value, low in (("--num-shots", num_shots, 0), ("--limit", limit, 1), ("--max-tokens", max_tokens, 1),
                             ("--concurrency", concurrency, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if not data:
        raise ValueError("--data is required: the MMLU-Pro test split (and optionally validation) as parquet, "
                         "JSON or JSONL")
    test_files, validation_files = split_files(data)
    if not test_files:
        raise ValueError("--data holds no test split (only files named val*)")
    test, validation = read_split(test_files), read_split(validation_files)
    questions = select(test.questions, subjects, limit)
    if not questions:
        raise ValueError("no valid test question to ask")
    shots: dict[str, list[Question]] = {}
    if num_shots:
        for v in validation.questions:
            if len(shots.setdefault(v.category, [])) < num_shots:
                shots[v.category].append(v)
    console = Console(highlight=False)
    bad = test.bad + validation.bad
    for where, why in bad[:BAD_LINES_SHOWN]:
        console.print(f"skipped {where}: {why}", style="yellow", markup=False)
    if len(bad) > BAD_LINES_SHOWN:
        console.print(f"... and {len(bad) - BAD_LINES_SHOWN} more malformed records skipped", style="yellow")
    categories = sorted({q.category for q in questions})
    for note in shot_notes(categories, shots, num_shots, bool(validation.questions)):
        console.print(note, style="dim", markup=False)

    if url:
        from gllm_engine.loader.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(engine_kwargs["tokenizer"]) if engine_kwargs["tokenizer"] else None

        async def online() -> tuple[str, list[Graded]]:
            async with ServerGenerator(url, api_key, model, tokenizer) as generator:
                return generator.model, await evaluate(generator, questions, shots, max_tokens, concurrency, console)

        name, graded = asyncio.run(online())
    else:
        from gllm_engine.config import EngineConfig
        from gllm_engine.entrypoints.async_llm import AsyncLLM

        config = EngineConfig.create(model, **engine_kwargs)
        with console.status("Loading the model..."):
            llm = AsyncLLM(config, show_progress=False)
        try:
            if llm.tokenizer is None:
                raise ValueError(f"{config.model.name} has no tokenizer, so it cannot read questions")
            graded = asyncio.run(evaluate(EngineGenerator(llm), questions, shots, max_tokens, concurrency, console))
        finally:
            llm.shutdown(grace_s=0)
        name = config.model.name

    counts = tally(graded)
    print_table(console, counts, f"MMLU-Pro: {name}")
    overall = counts["overall"]
    console.print(f"overall (micro) accuracy: {overall['accuracy']:.2%} ({overall['correct']} of "
                  f"{overall['questions']}); no answer found in {overall['no_answer']} replies (counted wrong)"
                  + (f"; {overall['failed']} requests failed (counted wrong)" if overall["failed"] else ""),
                  markup=False)
    failed = [g for g in graded if g.error is not None]
    if failed:
        console.print(f"the first failure: {failed[0].error}", style="bold red", markup=False)
    if output_json is not None:
        out = {"model": name, "mode": "online" if url else "offline", "num_shots": num_shots,
               "validation_questions": len(validation.questions), "max_tokens": max_tokens,
               "accuracy": counts, "skipped_records": [{"where": w, "why": y} for w, y in bad],
               "questions": [_record(g) for g in graded]}
        output_json.write_text(json.dumps(out, indent=1))
        console.print(f"wrote {output_json}", style="dim", markup=False)


eval_app = typer.Typer(name="eval", help="Evaluate a model on a benchmark.", no_args_is_help=True)
eval_app.command("mmlu-pro")(mmlu_pro)
