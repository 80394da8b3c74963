"""chat.py: the chat template: messages -> token ids and loss mask: the project's own ### headers
for byte-level models, or the model folder's own Jinja chat template.

A conversation is a list of {"role": "system" | "user" | "assistant", "content": text}. Training
learns only the assistant's turns: `encode` returns the ids and, per id, whether it is learned
(sft_data.py turns the rest into -100 labels); `prompt_ids` is what generation starts from: the
conversation up to the last assistant turn, with that turn's opening, so the model writes the reply.

With no template (byte tokenizer, tiktoken encoding), Alpaca's headers, learned part in [brackets]:

    ### System:               (when given)
    {system}

    ### Instruction:
    {user}

    ### Response:
    [{assistant}<|endoftext|>]

A pretrained model from a Hugging Face folder brings its own template (tokenizer_config.json's
"chat_template", or chat_template.jinja): a Jinja program over `messages`, `bos_token`, `eos_token`
and `add_generation_prompt`, for example ChatML's "<|im_start|>assistant\\n{content}<|im_end|>\\n".
It is rendered as transformers renders it (jinja2's sandbox, trim_blocks and lstrip_blocks, tojson,
raise_exception). The learned spans come from rendering prefixes of the conversation: for the
assistant turn i, render(messages[:i], add_generation_prompt) is the text before the reply and
render(messages[:i+1]) the text through its end, so the learned text is the difference: the content
and its end token(s), up to the last special token in it ("<|im_end|>", "<|eot_id|>"; a newline
after it is formatting, not learned). Each render must be a prefix of the whole conversation's, or
the template is refused in one line. Text and learned spans are encoded piece by piece, split where
learning starts, exactly as generation sees the prompt; special tokens in the rendered text
("<|im_start|>") encode as their special ids ({% generation %} markers, where a template has them,
are rendered as their body).

Run: `python chat.py` renders a two-turn conversation with the ### headers (byte tokenizer) and with
ChatML's template on a small BPE folder it writes (bpe.py), the learned tokens in [brackets];
`python chat.py FOLDER` with a model folder's own tokenizer and template.
"""
import datetime
import functools
import json
import sys
import tempfile
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox

import bpe
import data as data_lib
from data import DataError, eot_id

HEADERS = {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n"}


def to_messages(obj, where):
    """A parsed JSONL line -> a list of {role, content}; anything else: a DataError at file:line."""
    fields = ("Alpaca-style lines need \"instruction\" and \"output\" (and optionally \"input\"); "
              "chat-style lines need \"messages\": [{\"role\": ..., \"content\": ...}, ...]")
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object; {fields}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: \"messages\" must be a non-empty list of {{role, content}}")
        for m in msgs:
            if (not isinstance(m, dict) or not isinstance(m.get("content"), str)
                    or m.get("role") not in HEADERS):
                raise DataError(f"{where}: each message needs \"role\" (system, user or "
                                f"assistant) and a string \"content\", got {json.dumps(m)[:60]}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: no assistant message, so nothing to learn")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    missing = [k for k in ("instruction", "output") if not isinstance(obj.get(k), str)]
    if missing:
        raise DataError(f"{where}: missing field {', '.join(repr(k) for k in missing)} (or not a "
                        f"string); {fields}")
    user = obj["instruction"]
    if obj.get("input"):
        user += "\n\n### Input:\n" + str(obj["input"])
    return [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]


def read_jsonl(path):
    """[(where, messages)] for each non-blank line of `path`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (expected JSONL, one example per line)")
    out = []
    # a byte that is not UTF-8: one line naming file:line
    for lineno, line in data_lib.text_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        out.append((where, to_messages(obj, where)))
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def encode(enc, messages):
    """Token ids and, per token, whether it is learned: assistant contents and end token(s) only."""
    if getattr(enc, "chat_template", None):
        return encode_rendered(enc, messages)
    eot = eot_id(enc)
    ids, learned = [], []
    for m in messages:
        head = enc.encode_ordinary(HEADERS[m["role"]]
                                   + (m["content"] + "\n\n" if m["role"] != "assistant" else ""))
        ids += head
        learned += [False] * len(head)
        if m["role"] == "assistant":
            body = enc.encode_ordinary(m["content"]) + [eot]
            ids += body
            learned += [True] * len(body)
    return ids, learned


def prompt_ids(enc, messages):
    """The prompt for generation: all before the last assistant turn, and that turn's opening."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if getattr(enc, "chat_template", None):
        return enc.encode(render(enc, messages[:last], True), allowed_special="all")
    ids, _ = encode(enc, messages[:last])
    return ids + enc.encode_ordinary(HEADERS["assistant"])


def stop_ids(enc):
    """Ids that end a reply: the end-of-sequence id, the folder's other stop ids
    (generation_config.json), and the special token that closes an assistant turn in the template
    (ChatML's <|im_end|> on a base model)."""
    stops = {eot_id(enc), *getattr(enc, "stop_ids", ())}
    if getattr(enc, "chat_template", None):
        ids, learned = encode(enc, [{"role": "user", "content": "?"},
                                    {"role": "assistant", "content": "!"}])
        last = max(i for i, l in enumerate(learned) if l)
        if ids[last] in {enc.encode_single_token(s) for s in enc.special_tokens_set}:
            stops.add(ids[last])
    return stops


# ---------------------------------------------------------------------------------- Jinja templates
class Generation(jinja2.ext.Extension):
    """transformers' {% generation %}...{% endgeneration %} marker of assistant text: its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        return jinja2.nodes.Scope(parser.parse_statements(("name:endgeneration",),
                                                          drop_needle=True), lineno=lineno)


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.cache
def compile_template(source):
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals |= {"raise_exception": raise_exception,
                    "strftime_now": lambda fmt: datetime.datetime.now().strftime(fmt)}
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise DataError(f"the tokenizer's chat template does not compile: {e}") from None


def render(enc, messages, add_generation_prompt=False):
    try:
        return compile_template(enc.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=enc.bos_token,
            eos_token=enc.eos_token, tools=None, documents=None)
    except Exception as e:  # the template is the folder's program: what stops it is its error
        raise DataError(f"the tokenizer's chat template failed: {e or type(e).__name__}") from None


def learned_spans(enc, messages):
    """The conversation rendered, and each assistant turn's learned text as (start, end) offsets."""
    full, spans = render(enc, messages), []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = render(enc, messages[:i], True), render(enc, messages[:i + 1])
        if not (full.startswith(through) and through.startswith(before)):
            raise DataError(f"the tokenizer's chat template renders message {i + 1} differently "
                            "once later messages follow, so its learned tokens cannot be told "
                            "apart (prefix renders)")
        reply = through[len(before):]
        ends = [reply.rfind(s) + len(s) for s in enc.special_tokens_set if s in reply]
        spans.append((len(before), len(before) + (max(ends) if ends else len(reply))))
    return full, spans


def encode_rendered(enc, messages):
    full, spans = learned_spans(enc, messages)
    ids, learned, at = [], [], 0
    for a, b in spans + [(len(full), len(full))]:
        for x, y, flag in ((at, a, False), (a, b, True)):
            piece = enc.encode(full[x:y], allowed_special="all")
            ids += piece
            learned += [flag] * len(piece)
        at = b
    return ids, learned


# ----------------------------------------------------------------------------------------- the demo
CHATML = ("{% for m in messages %}"
          "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
DEMO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse golf."},
        {"role": "assistant", "content": "flog"}, {"role": "user", "content": "And echo?"},
        {"role": "assistant", "content": "ohce"}]


def demo_folder():
    """Our model folder: 200 merges learned on this file (bpe.py), ChatML's tokens and template."""
    folder = Path(tempfile.mkdtemp(prefix="chat-demo-"))
    merges = bpe.learn_merges(Path(__file__).read_text(encoding="utf-8"), 200)
    tj = bpe.gpt2_style_json(merges, added=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                              "chat_template": CHATML}))
    return folder


def show(spec, messages):
    enc = data_lib.get_tokenizer(spec)
    ids, learned = encode(enc, messages)
    kind = "its Jinja chat template" if getattr(enc, "chat_template", None) else "### headers"
    print(f"--- tokenizer {spec}: {kind}; {len(ids)} tokens, {sum(learned)} learned "
          "(in [brackets]):")
    out, i = "", 0
    while i < len(ids):
        j = next((k for k in range(i, len(ids)) if learned[k] != learned[i]), len(ids))
        out += f"[{enc.decode(ids[i:j])}]" if learned[i] else enc.decode(ids[i:j])
        i = j
    print(out)
    print(f"generation prompt ends with {enc.decode(prompt_ids(enc, messages))[-32:]!r}; a reply "
          f"stops at ids {sorted(stop_ids(enc))}\n")


def main(argv):
    for spec in argv or ["bytes", str(demo_folder())]:
        show(spec, DEMO)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except DataError as e:
        sys.exit(f"chat.py: error: {e}")
