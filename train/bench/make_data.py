#!/usr/bin/env python3
"""Writes the fixed synthetic training examples of the train-step benchmark.

Usage: make_data.py OUT.jsonl [COUNT]

Each line is {"prompt": ..., "response": ...} (nanofleet-train's load_jsonl format): a short
question and a long answer (~450 words, well over 256 tokens), made of words drawn by a seeded
generator, so that the file is the same on every machine and the trained step sees
`seq` tokens of mostly response (the loss covers response tokens only).
"""
import json
import random
import sys

WORDS = (
    "the a of to and in is that for it as was with on be by this are from at or an have not "
    "river mountain signal quiet engine garden window market lantern harbor winter summer "
    "network device model update round server client packet latency battery memory sensor "
    "bright slow careful simple distant green heavy early ancient modern small large "
    "carries measures follows builds returns sends keeps finds opens moves learns shares "
    "because while after before when although since until unless whether"
).split()
TOPICS = ["lighthouses", "federated learning", "mountain rivers", "old markets",
          "battery chemistry", "winter gardens", "network routing", "sensor calibration"]


def main():
    out = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    rng = random.Random(20240611)
    with open(out, "w") as f:
        for i in range(count):
            topic = TOPICS[i % len(TOPICS)]
            sentences = []
            for _ in range(40):
                n = rng.randint(8, 14)
                words = [rng.choice(WORDS) for _ in range(n)]
                sentences.append(" ".join(words).capitalize() + ".")
            f.write(json.dumps({
                "prompt": f"Tell me a long story about {topic} (number {i}).",
                "response": " ".join(sentences),
            }) + "\n")


if __name__ == "__main__":
    main()
