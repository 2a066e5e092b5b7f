"""vLLM's token-counting routes: ``POST /tokenize`` and ``POST /detokenize``.

``/tokenize`` takes a ``prompt`` or chat ``messages`` (and optional ``tools``; rendered with the model's chat template as
chat completions render them) and returns the token ids, their ``count`` and ``max_model_len``: a client can check a
request fits before sending it. The ids are exactly those the completion routes count in
``usage.prompt_tokens``. ``/detokenize`` turns ids back into text.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request

from ..errors import InvalidRequest
from ..generation import ChatPrompt, Generation
from . import tool_calls
from .schema import ChatMessage, Tool, _Strict, parse


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None  # messages only: rendered as chat completions render them
    add_generation_prompt: bool = True  # messages only: end with the assistant's turn, as chat completions do
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class TokenizeRoutes:
    def __init__(self, generation: Generation):
        self.gen = generation

    def _check_model(self, name: str | None) -> None:
        if name is not None:  # the base model or an adapter: they share the tokenizer
            self.gen.resolve_model(name)

    async def tokenize(self, request: Request) -> dict:
        body = parse(TokenizeRequest, await request.body())
        self._check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequest("give either prompt or messages", param="prompt" if body.prompt is None else "messages")
        if body.prompt is not None:
            ids = self.gen.encode(body.prompt)
        else:
            messages, tools = tool_calls.prompt_messages(body.messages, body.tools or [], self.gen.chat_template)
            ids = self.gen.chat_prompt(ChatPrompt(messages, tools, body.add_generation_prompt))
        answer = {"count": len(ids), "max_model_len": self.gen.max_model_len, "tokens": ids}
        if body.return_token_strs:
            answer["token_strs"] = self.gen.token_strs(ids)
        return answer

    async def detokenize(self, request: Request) -> dict:
        body = parse(DetokenizeRequest, await request.body())
        self._check_model(body.model)
        ids = self.gen.encode(body.tokens, param="tokens") if body.tokens else []
        return {"prompt": self.gen.decode(ids, clean_up=None)}


def register(app: FastAPI, routes: TokenizeRoutes) -> None:
    router = APIRouter(tags=["Tokenizer"])
    router.add_api_route("/tokenize", routes.tokenize, methods=["POST"])
    router.add_api_route("/detokenize", routes.detokenize, methods=["POST"])
    app.include_router(router)
