"""The official `openai` Python client against an agent's local API.

Usage: openai_client.py HOST:PORT MODEL API_KEY
Exits non-zero with the failed check on stderr; prints one line per check that passed.
"""
import sys

import openai

address, model, key = sys.argv[1:4]
client = openai.OpenAI(base_url=f"http://{address}/v1", api_key=key, max_retries=0)
question = [{"role": "user", "content": "What is the capital of France?"}]

ids = [m.id for m in client.models.list().data]
assert model in ids, ids
print("models:", ids)

chat = client.chat.completions.create(
    model=model, messages=question, max_tokens=24, temperature=0
)
answer = chat.choices[0].message.content
assert chat.object == "chat.completion"
assert answer.strip(), chat
assert chat.choices[0].finish_reason in ("stop", "length"), chat
assert chat.usage.completion_tokens > 0
assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
print("chat:", repr(answer), chat.usage)

pieces, usage, finish = [], None, None
stream = client.chat.completions.create(
    model=model,
    messages=question,
    max_tokens=24,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.choices:
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage
assert "".join(pieces) == answer, (pieces, answer)
assert finish == chat.choices[0].finish_reason, finish
assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage
print("stream:", len(pieces), "chunks, same text as the plain answer")

text = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=6, temperature=0)
assert text.object == "text_completion" and text.choices[0].text, text
print("completion:", repr(text.choices[0].text))

try:
    client.chat.completions.create(model=model, messages=[], max_tokens=4)
    sys.exit("an empty message list was accepted")
except openai.BadRequestError as error:
    assert error.status_code == 400 and "messages" in str(error), error
    print("bad request:", error.status_code)

try:
    client.chat.completions.create(model="no-such-model", messages=question, max_tokens=4)
    sys.exit("an unknown model was accepted")
except openai.NotFoundError as error:
    print("unknown model:", error.status_code)

try:
    openai.OpenAI(base_url=f"http://{address}/v1", api_key="wrong", max_retries=0).models.list()
    sys.exit("a wrong API key was accepted")
except openai.AuthenticationError as error:
    print("wrong key:", error.status_code)
