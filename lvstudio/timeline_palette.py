"""The timeline's colours, shared by both studios (tui/widgets.py and web/page.py) so a shot or live prompt has the
same colour in the terminal and in the browser: storyboard shots cycle through SHOT_COLOURS, live prompts through
LIVE_COLOURS (indexed by the prompt event's number)."""

from __future__ import annotations

SHOT_COLOURS = ("#3b82f6", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#14b8a6", "#eab308", "#ec4899")
LIVE_COLOURS = ("#e879f9", "#22d3ee", "#a3e635", "#fb923c")
