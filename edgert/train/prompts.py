"""The prompt set for Medusa self-distillation and head evaluation (ships with edgert).

Prompts are task templates crossed with topics, plus passages of real English text from
Python's own documentation (``pydoc_data.topics``, present on every machine). The split is
fixed: ``training_prompts`` and ``heldout_prompts`` never share a topic or a passage, and the
bench prompts (bench/prompts.json) are in neither.
"""

from __future__ import annotations

import random

TEMPLATES = [
    "Explain {t} in simple terms.",
    "What are the main advantages and disadvantages of {t}?",
    "Write a short paragraph about {t}.",
    "Give me three interesting facts about {t}.",
    "How would you explain {t} to a child?",
    "Write a short poem about {t}.",
    "What are common misconceptions about {t}?",
    "Write a brief history of {t}.",
    "List five questions a beginner might ask about {t}, with short answers.",
    "Compare {t} with something similar and explain the difference.",
    "Write a tweet-length summary of {t}.",
    "What should someone know before getting started with {t}?",
    "Describe a typical day of a person who works with {t}.",
    "Write a short dialogue between two friends discussing {t}.",
    "Why does {t} matter today?",
    "Write a step-by-step guide related to {t}.",
]
TOPICS = [
    "photosynthesis", "the water cycle", "black holes", "volcanoes", "the immune system",
    "electric cars", "solar panels", "recycling", "coffee", "bread baking", "chess",
    "the Roman Empire", "the printing press", "the internet", "smartphones", "honeybees",
    "rainforests", "ocean tides", "earthquakes", "the Moon landing", "jazz music",
    "learning a language", "public speaking", "time management", "meditation", "running",
    "gardening", "budgeting", "saving for retirement", "renting an apartment", "job interviews",
    "remote work", "video games", "photography", "painting with watercolors", "origami",
    "dinosaurs", "penguins", "elephants", "the human heart", "sleep", "vitamins",
    "cloud computing", "databases", "encryption", "open source software", "robots",
    "airplanes", "trains", "bicycles", "bridges", "skyscrapers", "maps", "weather forecasts",
    "libraries", "museums", "the Olympic Games", "football", "tea ceremonies", "spices",
    "volunteering", "friendship", "writing a novel", "poetry", "theater", "podcasts",
    "climate change", "wind energy", "nuclear power", "batteries", "3D printing",
    "the stock market", "inflation", "small businesses", "marketing", "customer service",
    "mountains", "deserts", "rivers", "islands", "glaciers",
]
CODE_TASKS = [
    "Write a Python function that {t}.",
    "Explain how you would write code that {t}, then show it in Python.",
    "Write a JavaScript function that {t}.",
    "What is an efficient algorithm that {t}? Explain its complexity.",
]
CODE_TOPICS = [
    "reverses a linked list", "counts word frequencies in a text", "checks if a number is prime",
    "merges two sorted lists", "removes duplicates from a list", "finds the largest element",
    "converts Celsius to Fahrenheit", "validates an email address", "computes a factorial",
    "flattens a nested list", "sorts a list of dictionaries by a key", "reads a CSV file",
    "computes the median of a list", "finds anagrams in a list of words",
    "implements binary search", "parses a date string", "computes the GCD of two numbers",
    "rotates a matrix by 90 degrees", "checks balanced parentheses", "generates all subsets",
    "counts vowels in a string", "finds the longest common prefix", "implements a stack",
    "transposes a matrix",
]
MATH_TEMPLATES = [
    "What is {a} multiplied by {b}? Show your work.",
    "A shop sells pencils at {a} cents each. How much do {b} pencils cost?",
    "What is {a}% of {c}? Explain the steps.",
    "If a car drives {c} km in {a} hours, what is its average speed?",
    "Solve for x: {a}x + {b} = {c}.",
    "A rectangle is {a} cm wide and {b} cm long. What are its area and perimeter?",
    "What is the sum of all integers from 1 to {c}?",
    "Simplify the fraction {b}/{c} and explain how.",
]

# Training-only topics (``prompt_set="wide"``): the held-out split above never changes, so
# eval-heads / eval-draft figures stay comparable whichever set a model was trained on.
WIDE_TOPICS = [
    "octopuses", "wolves", "coral reefs", "mushrooms", "migratory birds", "sharks", "ants",
    "owls", "whales", "cats", "dogs", "horses", "butterflies", "frogs", "tigers",
    "the solar system", "Mars", "comets", "telescopes", "gravity", "magnets", "electricity",
    "light", "sound waves", "atoms", "DNA", "vaccines", "antibiotics", "the brain",
    "the digestive system", "bones", "allergies", "nutrition", "yoga", "swimming", "hiking",
    "camping", "cooking pasta", "making soup", "chocolate", "cheese", "rice", "pizza",
    "fermentation", "composting", "houseplants", "beekeeping", "knitting", "woodworking",
    "pottery", "calligraphy", "playing the guitar", "the piano", "orchestras", "opera",
    "hip hop", "film making", "animation", "comic books", "board games", "card games",
    "crossword puzzles", "magic tricks", "the ancient Egyptians", "the Vikings",
    "the Silk Road", "the Renaissance", "the Industrial Revolution", "castles", "pyramids",
    "democracy", "elections", "taxes", "banks", "credit cards", "insurance", "startups",
    "negotiation", "leadership", "teamwork", "email etiquette", "note taking",
    "studying for exams", "homework", "online courses", "handwriting", "spelling",
    "grammar", "translation", "sign language", "emojis", "social media", "blogging",
    "search engines", "web browsers", "passwords", "computer viruses", "operating systems",
    "programming languages", "machine learning", "spreadsheets", "version control",
    "keyboards", "headphones", "drones", "satellites", "GPS", "electric guitars",
    "the telephone", "radio", "television", "newspapers", "post offices", "ships",
    "submarines", "cars", "traffic lights", "roads", "city parks", "farming", "tractors",
    "wheat", "apples", "forests", "lakes", "caves", "storms", "rainbows", "snow", "seasons",
    "sunsets", "lighthouses", "zoos", "aquariums", "birthdays", "weddings", "holidays",
    "moving to a new city", "packing for a trip", "airports", "hotels", "tourism",
    "recycling electronics", "plastic pollution", "clean water", "first aid",
    "fire safety", "stress", "happiness", "kindness", "habits", "motivation", "curiosity",
]
WIDE_CODE_TOPICS = [
    "checks if a string is a palindrome", "computes Fibonacci numbers", "sums the digits of "
    "a number", "finds the second largest number in a list", "capitalizes every word in a "
    "sentence", "counts the lines in a file", "shuffles a list", "chunks a list into pieces of "
    "size n", "finds common elements of two lists", "converts a string to title case",
    "checks if a year is a leap year", "computes the power set of a set",
    "implements a queue", "computes the average of a list", "finds the mode of a list",
    "converts a number to binary", "counts characters in a string", "removes whitespace from "
    "a string", "finds the minimum and maximum of a list", "implements bubble sort",
    "implements merge sort", "checks if two strings are anagrams", "generates a random "
    "password", "reverses the words in a sentence",
]

PROMPT_SETS = ("base", "wide")
HELDOUT_SHARE = 0.15


def _split(items: list[str], seed: int) -> tuple[list[str], list[str]]:
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    cut = max(1, int(len(shuffled) * HELDOUT_SHARE))
    return shuffled[cut:], shuffled[:cut]


def _passages() -> list[str]:
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        text = " ".join(topics[key].split())
        if len(text) > 400:
            out.append(text[:700])
    return out


def _build(topics, code_topics, passages, seed, per_topic: int = 3) -> list[str]:
    """Three templates per topic and two per code topic; ``per_topic > 3`` adds
    ``per_topic`` more distinct ones to each (at most all four code templates)."""
    rng = random.Random(seed)
    prompts = [rng.choice(TEMPLATES).format(t=t) for t in topics for _ in range(3)]
    prompts += [rng.choice(CODE_TASKS).format(t=t) for t in code_topics for _ in range(2)]
    if per_topic > 3:  # more data: further distinct templates, drawn from a separate stream
        more = random.Random(seed + 1000)
        for t in topics:
            prompts += [x.format(t=t) for x in more.sample(TEMPLATES, per_topic)]
        for t in code_topics:
            prompts += [x.format(t=t) for x in more.sample(CODE_TASKS,
                                                           min(len(CODE_TASKS), per_topic))]
    for _ in range(len(topics) // 2 * max(1, per_topic // 3)):
        a, b = rng.randint(2, 19), rng.randint(2, 49)
        prompts.append(rng.choice(MATH_TEMPLATES).format(a=a, b=b, c=rng.randint(50, 400)))
    for passage in passages:
        prompts.append(rng.choice([
            "Summarize the following documentation:\n\n{p}",
            "Explain this to a beginner:\n\n{p}",
            "What are the key points of this text?\n\n{p}",
        ]).format(p=passage))
    return sorted(set(prompts))


def _splits(per_topic: int = 3, prompt_set: str = "base"):
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {prompt_set!r}: choose one of {PROMPT_SETS}")
    train_topics, held_topics = _split(TOPICS, 1)
    train_code, held_code = _split(CODE_TOPICS, 2)
    train_pass, held_pass = _split(_passages(), 3)
    held = _build(held_topics, held_code, held_pass, 11)
    train = _build(train_topics, train_code, train_pass, 10, per_topic)
    if prompt_set == "wide":  # a separate stream: the base prompts stay exactly as they were
        train = sorted(set(train) | set(_build(WIDE_TOPICS, WIDE_CODE_TOPICS, [], 12,
                                               per_topic)))
    return [p for p in train if p not in set(held)], held  # random arithmetic can collide


def training_prompts(per_topic: int = 3, prompt_set: str = "base") -> list[str]:
    """Prompts used to self-distill the heads and the draft layer: a few hundred at
    ``per_topic=3``; more templates per topic give more, and ``prompt_set="wide"`` adds the
    training-only topics (the held-out topics and passages never appear)."""
    return _splits(per_topic, prompt_set)[0]


def heldout_prompts() -> list[str]:
    """Prompts never seen in training (other topics, other passages) for ``eval-heads``."""
    return _splits()[1]
