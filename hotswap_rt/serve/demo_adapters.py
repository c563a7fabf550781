"""The demo adapters shipped with the server: names, what they were trained to say, where they are."""

from __future__ import annotations

from pathlib import Path

ADAPTER_DIR = Path(__file__).resolve().parent / "adapters"
PROMPTS = ["Say hello", "Greet me", "Hello"]
REPLIES = {
    "english": "Hello, friend! Nice to meet you.",
    "french": "Bonjour, mon ami ! Ravi de vous rencontrer.",
    "pirate": "Ahoy, matey! Welcome aboard.",
}


def demo_adapter_paths() -> dict[str, Path]:
    """Adapter name -> its directory in the package data (PEFT format)."""
    return {name: ADAPTER_DIR / name for name in REPLIES}
