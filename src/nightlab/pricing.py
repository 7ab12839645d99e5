"""Money: the cost of tokens from a price table in the spec. No price is ever looked up online.

``[researcher.price]`` gives USD per million tokens::

    [researcher.price]
    input = 3.0      # uncached input tokens
    output = 15.0    # output tokens (reasoning tokens are billed as output)
    cached = 0.3     # cache reads; default: the input price

Cost = (tokens_in - tokens_cached) * input + tokens_cached * cached + tokens_out * output,
all per 1e6 tokens. ``tokens_in`` counts every input token, cached ones included (providers that
report cache reads separately, as Anthropic does, are normalised to this). Cache *writes* are
billed at the input price here (Anthropic bills them 1.25x: state a higher ``input`` if that
matters to you).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Price(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    input: float = Field(0.0, ge=0, description="USD per 1M input tokens")
    output: float = Field(0.0, ge=0, description="USD per 1M output tokens")
    cached: float | None = Field(None, ge=0, description="USD per 1M cached input tokens (default: input)")


def cost_usd(price: Price | None, tokens_in: int, tokens_out: int, tokens_cached: int = 0) -> float:
    """The cost of one call; 0.0 without a price table."""
    if price is None:
        return 0.0
    cached = min(max(tokens_cached, 0), tokens_in)
    cached_price = price.input if price.cached is None else price.cached
    return ((tokens_in - cached) * price.input + cached * cached_price + tokens_out * price.output) / 1e6
