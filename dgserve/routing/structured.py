"""What a chat request's tools and response_format ask of the output: the tools the chat template declares, how the
output is read back (tool calls parsed from the model's format, or a call forced by constrained JSON), and the JSON
constraint the engine denoises under. Schema keywords constrained denoising cannot enforce are a 400 here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from dgserve.engine.grammar import JsonConstraint, UnsupportedSchema, check_schema
from dgserve.routing.choices import ToolMode, required_call_schema
from dgserve.routing.errors import OpenAIHTTPError
from dgserve.routing.openai_protocol import ChatCompletionRequest, NamedToolChoice


@dataclass
class OutputPlan:
    template_tools: list[dict[str, Any]] | None = None  # what the chat template declares
    tool_mode: ToolMode | None = None
    tool_name: str | None = None  # tool_mode "named"
    constraint: JsonConstraint | None = None
    keep_special_tokens: bool = False  # the tool-call markers are special tokens: the parser must see them


def plan_output(body: ChatCompletionRequest, template_has_tools: bool) -> OutputPlan:
    tools = body.tools or []
    uses_tools = any(m.tool_calls or m.role == "tool" for m in body.messages)
    if uses_tools and not template_has_tools:
        raise OpenAIHTTPError(400, "This model's chat template has no tool format, so it cannot be shown tool calls "
                              "or tool results: send them as ordinary assistant and user text.", param="messages",
                              code="tools_not_supported")
    plan = OutputPlan(template_tools=[t.model_dump(exclude_none=True) for t in tools]
                      if tools and template_has_tools else None)
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    forced = isinstance(choice, NamedToolChoice) or choice == "required"
    if forced and body.response_format is not None and body.response_format.type != "text":
        raise OpenAIHTTPError(400, "response_format cannot be combined with a forced tool_choice: the output is "
                              "then the call's arguments, under the function's parameters schema",
                              param="response_format")
    if isinstance(choice, NamedToolChoice):
        (tool,) = [t for t in tools if t.function.name == choice.function.name]
        params = tool.function.parameters or {"type": "object"}
        _check(params, "tools", f"tools[{tools.index(tool)}].function.parameters")
        plan.tool_mode, plan.tool_name = "named", tool.function.name
        plan.constraint = JsonConstraint(json.dumps(params))
    elif choice == "required":
        pairs = []
        for i, t in enumerate(tools):
            params = t.function.parameters or {"type": "object"}
            _check(params, "tools", f"tools[{i}].function.parameters")
            pairs.append((t.function.name, params))
        plan.tool_mode = "required"
        plan.constraint = JsonConstraint(json.dumps(required_call_schema(pairs)))
    elif choice == "auto" and plan.template_tools:
        plan.tool_mode, plan.keep_special_tokens = "parse", True
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        plan.constraint = JsonConstraint(None)
    elif fmt is not None and fmt.type == "json_schema":
        assert fmt.json_schema is not None
        _check(fmt.json_schema.schema_, "response_format", "response_format.json_schema.schema")
        plan.constraint = JsonConstraint(json.dumps(fmt.json_schema.schema_))
    return plan


def _check(schema: Any, param: str, where: str) -> None:
    try:
        check_schema(schema, where)
    except UnsupportedSchema as exc:
        raise OpenAIHTTPError(400, f"{exc}. Constrained decoding cannot enforce it; remove it from the schema.",
                              param=param, code="unsupported_schema") from None
