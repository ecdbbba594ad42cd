"""The three transitions between prompts: one vocabulary for storyboards, live prompts and rendered storyboards.

    cut     a new shot. Nothing of the previous shot conditions the next, except what the storyboard names on
            purpose: identities ({hero}, through their text) and anchors placed in the new shot. Each backend
            starts fresh: an empty KV cache (causal-kv), a fresh moving buffer (streaming-dit), a clip without
            carried latents (erft-crossclip); the streaming VAE decoder restarts with zero history.
    switch  the same shot continues under the new prompt: LongLive's KV re-cache (causal-kv), the moving buffer's
            natural hand-over (streaming-dit), carried latents (erft-crossclip).
    blend   the same shot, the text embeddings faded from the previous prompt to the new one over N seconds.

Storyboard shots default to `cut` (a new `[[shots]]` entry is a new shot); live prompts default to `switch` (they
steer the shot you are watching). Storyboards written before `switch` existed keep parsing; their `cut` used to
do what `switch` does now (re-cache the KV window under the new prompt) and now starts a new shot.
"""

from __future__ import annotations

CUT, SWITCH, BLEND = "cut", "switch", "blend"
TRANSITIONS: tuple[str, ...] = (CUT, SWITCH, BLEND)
STORYBOARD_DEFAULT = CUT
LIVE_DEFAULT = SWITCH
LIVE_CHOICES: tuple[str, ...] = (SWITCH, CUT, BLEND)  # the order the studios offer them (the TUI toggle's cycle)


def check_transition(kind: str) -> str:
    """`kind` if it names a transition; ValueError naming the three otherwise."""
    if kind not in TRANSITIONS:
        raise ValueError(f"transition must be one of {', '.join(TRANSITIONS)} (got {kind!r})")
    return kind
