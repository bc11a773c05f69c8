"""What a disaggregated run records (pure Python, no torch): one `KVTransfer` per request whose
prompt's K/V went from the prefill instance to the decode instance."""
from __future__ import annotations

from dataclasses import dataclass


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """K and V of one token, every layer: 2 x layers x KV heads x head size x dtype bytes."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


@dataclass(frozen=True)
class KVTransfer:
    """The prompt K/V of one request, shipped from the prefill instance into the decode instance's
    blocks. Positions before ``first_position`` were not sent: the decode instance's prefix cache
    already held them. Times are the decode instance's wall clock (``time.time()``), from its first
    layer's receive to its last."""

    request_id: str
    num_prompt_tokens: int
    first_position: int  # the first position sent: the decode side had the ones before it
    num_tokens: int  # positions sent: num_prompt_tokens - first_position
    decode_block_ids: tuple[int, ...]  # the decode instance's blocks the sent positions went into
    num_layers: int  # one send per layer: that layer's K and V of every position sent
    num_bytes: int
    start_time: float
    end_time: float

    @property
    def seconds(self) -> float:
        return self.end_time - self.start_time

    @property
    def num_blocks(self) -> int:
        return len(self.decode_block_ids)

    @property
    def num_cached_tokens(self) -> int:
        """Prompt positions the decode instance's prefix cache served, so were not sent."""
        return self.first_position

    @property
    def bytes_per_second(self) -> float:
        return self.num_bytes / self.seconds if self.seconds > 0 else float("inf")
