"""The project's own built-in instruction data.

``lightning_bdvax`` ships a small, self-contained source of instruction/answer
pairs so that the README demo (plant a backdoor into SmolLM2-135M-Instruct,
then purify it) and the test-suite never depend on an external data set and
never download anything at run time.

Everything here is *written by this project*: nothing is copied from Alpaca,
BackdoorLLM or any other corpus.  Records are generated procedurally from
handwritten templates and small embedded tables (word lists, plural forms,
antonyms, capitals, definitions, tips, ...).  Every answer is computed by the
program from the same parameters that fill the instruction (sums are added,
words are reversed, temperatures are converted with exact fractions, ...), so
the answers are correct by construction; the few factual tables contain only
well-known, uncontroversial facts.

Records follow the familiar ``{"instruction", "input", "output"}`` layout:
``input`` is usually ``""`` and sometimes carries the text to operate on.
Outputs are short (one to three sentences) and phrased like a polite, helpful
assistant.

Generation is deterministic for a given ``(n, seed)`` (a private
:class:`random.Random` is used, never the global random state), contains no
duplicate ``instruction``+``input`` pair within one call, and interleaves the
task families.  It uses the Python standard library only and produces several
thousand records in a fraction of a second.

Public API
----------
* :func:`builtin_instructions` -- ``n`` shuffled records.
* :func:`builtin_splits` -- disjoint named splits drawn from one call.
* :func:`builtin_families` -- names of the task families.
* :func:`builtin_capacity` -- the largest ``n`` that can be produced uniquely.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

__all__ = [
    "builtin_instructions",
    "builtin_splits",
    "builtin_families",
    "builtin_capacity",
]

_Rendered = Tuple[str, str, str]  # (instruction, input, output)

# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------

_NUMBER_WORDS = {
    1: "one", 2: "two", 3: "three", 4: "four", 5: "five",
    6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten",
}


def _join(items: Sequence[str]) -> str:
    """English list: ``a and b`` / ``a, b, and c``."""
    items = list(items)
    if len(items) == 1:
        return items[0]
    if len(items) == 2:
        return f"{items[0]} and {items[1]}"
    return ", ".join(items[:-1]) + f", and {items[-1]}"


def _times(k: int) -> str:
    if k == 1:
        return "once"
    if k == 2:
        return "twice"
    return f"{k} times"


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _fmt_exact(value: Fraction) -> str:
    """Exact decimal for a terminating fraction (e.g. 5/2 -> ``2.5``)."""
    if value.denominator == 1:
        return str(value.numerator)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for digits in range(1, 7):
        scaled = value * 10**digits
        if scaled.denominator == 1:
            whole, frac = divmod(scaled.numerator, 10**digits)
            return f"{sign}{whole}.{frac:0{digits}d}".rstrip("0").rstrip(".")
    raise ValueError(f"{value} has no short exact decimal form")


def _round_half_up(value: Fraction, digits: int = 1) -> Tuple[str, bool]:
    """Round to ``digits`` decimals (half away from zero); return (text, exact)."""
    scale = 10**digits
    scaled = abs(value) * scale
    rounded = math.floor(scaled + Fraction(1, 2))
    exact = Fraction(rounded, scale) == abs(value)
    result = Fraction(rounded, scale) * (1 if value >= 0 else -1)
    return _fmt_exact(result), exact


def _bank_rng(name: str) -> random.Random:
    """A fixed RNG for building embedded banks (independent of the user seed)."""
    return random.Random("lightning-bdvax-bank:" + name)


# ---------------------------------------------------------------------------
# embedded tables (all written for this project)
# ---------------------------------------------------------------------------

_WORDS_RAW = """
apple banana garden window pencil rocket planet candle forest river bridge
castle dragon flower guitar hammer island jacket kitten ladder marble needle
orange pepper rabbit saddle ticket turtle velvet wizard yellow zipper anchor
basket butter carrot cookie dinner engine falcon finger frozen golden harbor
helmet insect jungle kettle lemon magnet meadow monkey napkin number ocean
paddle parrot pillow pocket puzzle quiet rainbow ribbon salmon silver spider
summer sunset tablet thunder tomato travel tunnel umbrella valley violin
wallet winter wonder bottle camera circle doctor family gentle honey letter
mirror muffin noodle pirate pretzel rhythm school shadow simple spring sugar
teacher thread village whistle button cactus dolphin feather giraffe holiday
journey kingdom lantern library mountain notebook octopus pancake penguin
picture pumpkin question sandwich science student sweater blanket chicken
cupboard diamond elephant festival freedom granite hospital kitchen morning
breakfast weather market friend bread chair cloud dance earth grape house
light music paper plant queen smile stone table train water zebra brave happy
lucky quick blossom cinnamon compass desert evening forever galaxy hamster
iceberg jelly koala lobster mango nature oyster puppy raccoon scarf tiger
unicorn voyage walnut yogurt acorn beach cherry daisy eagle fabric glove
harvest igloo jigsaw kennel lizard meteor nectar orchard peanut quilt saucer
tractor velcro waffle pebble crayon ferry goose
"""
_WORDS: List[str] = list(dict.fromkeys(_WORDS_RAW.split()))

_PLURALS: List[Tuple[str, str]] = [
    ("child", "children"), ("mouse", "mice"), ("person", "people"),
    ("man", "men"), ("woman", "women"), ("tooth", "teeth"), ("foot", "feet"),
    ("goose", "geese"), ("ox", "oxen"), ("sheep", "sheep"), ("deer", "deer"),
    ("leaf", "leaves"), ("knife", "knives"), ("wife", "wives"),
    ("wolf", "wolves"), ("half", "halves"), ("loaf", "loaves"),
    ("shelf", "shelves"), ("calf", "calves"), ("life", "lives"),
    ("thief", "thieves"), ("city", "cities"), ("baby", "babies"),
    ("party", "parties"), ("story", "stories"), ("box", "boxes"),
    ("fox", "foxes"), ("bus", "buses"), ("church", "churches"),
    ("dish", "dishes"), ("watch", "watches"), ("glass", "glasses"),
    ("potato", "potatoes"), ("tomato", "tomatoes"), ("hero", "heroes"),
    ("book", "books"), ("cat", "cats"), ("dog", "dogs"), ("tree", "trees"),
    ("car", "cars"), ("apple", "apples"), ("chair", "chairs"),
    ("house", "houses"), ("key", "keys"), ("toy", "toys"), ("day", "days"),
    ("boy", "boys"), ("photo", "photos"), ("piano", "pianos"),
    ("zoo", "zoos"), ("roof", "roofs"), ("chief", "chiefs"),
    ("crisis", "crises"), ("analysis", "analyses"),
    ("phenomenon", "phenomena"), ("criterion", "criteria"),
    ("brush", "brushes"), ("lady", "ladies"), ("monkey", "monkeys"),
]

# each word appears in exactly one pair; both directions are used
_ANTONYM_PAIRS: List[Tuple[str, str]] = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"),
    ("up", "down"), ("open", "closed"), ("light", "dark"), ("early", "late"),
    ("rich", "poor"), ("young", "old"), ("tall", "short"), ("full", "empty"),
    ("strong", "weak"), ("hard", "soft"), ("wet", "dry"), ("clean", "dirty"),
    ("loud", "quiet"), ("thick", "thin"), ("wide", "narrow"), ("high", "low"),
    ("inside", "outside"), ("push", "pull"), ("buy", "sell"), ("win", "lose"),
    ("remember", "forget"), ("arrive", "depart"), ("true", "false"),
    ("safe", "dangerous"), ("cheap", "expensive"), ("near", "far"),
    ("first", "last"), ("day", "night"), ("love", "hate"),
    ("asleep", "awake"), ("question", "answer"), ("always", "never"),
    ("before", "after"), ("polite", "rude"), ("easy", "difficult"),
    ("ancient", "modern"), ("increase", "decrease"), ("entrance", "exit"),
    ("friend", "enemy"), ("accept", "reject"), ("give", "take"),
]

_CAPITALS: List[Tuple[str, str]] = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"),
    ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("the United Kingdom", "London"), ("Ireland", "Dublin"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Brazil", "Brasília"),
    ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Russia", "Moscow"),
    ("Greece", "Athens"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("the Czech Republic", "Prague"), ("Belgium", "Brussels"),
    ("South Korea", "Seoul"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("Turkey", "Ankara"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Colombia", "Bogotá"), ("New Zealand", "Wellington"),
    ("Iceland", "Reykjavik"), ("Cuba", "Havana"),
    ("the Philippines", "Manila"), ("Saudi Arabia", "Riyadh"),
    ("Iran", "Tehran"), ("Nigeria", "Abuja"), ("Ghana", "Accra"),
    ("Ethiopia", "Addis Ababa"), ("Morocco", "Rabat"), ("Ukraine", "Kyiv"),
    ("Romania", "Bucharest"), ("the United States", "Washington, D.C."),
]

# subtractive (paint) colour mixing, the classic primary/secondary basics
_COLOR_MIXES: List[Tuple[str, str, str]] = [
    ("red", "yellow", "orange"), ("blue", "yellow", "green"),
    ("red", "blue", "purple"), ("red", "white", "pink"),
    ("black", "white", "gray"), ("blue", "white", "light blue"),
]

_DEFINITIONS: List[Tuple[str, str]] = [
    ("umbrella", "An umbrella is a folding canopy on a handle that keeps you dry in the rain or shaded from the sun."),
    ("kettle", "A kettle is a container used for boiling water, usually to make tea or coffee."),
    ("calendar", "A calendar is a chart or system that shows the days, weeks, and months of a year."),
    ("library", "A library is a place where books and other materials are kept for people to read or borrow."),
    ("bridge", "A bridge is a structure built so that people or vehicles can cross over a river, road, or valley."),
    ("recipe", "A recipe is a set of instructions that explains how to prepare a particular dish."),
    ("thermometer", "A thermometer is an instrument used to measure temperature."),
    ("passport", "A passport is an official document that proves who you are and lets you travel between countries."),
    ("breakfast", "Breakfast is the first meal of the day, usually eaten in the morning."),
    ("pillow", "A pillow is a soft cushion that supports your head while you rest or sleep."),
    ("ladder", "A ladder is a set of steps between two long side pieces, used for climbing up or down."),
    ("map", "A map is a drawing of an area that shows where places, roads, and other features are."),
    ("garden", "A garden is a piece of land where people grow flowers, vegetables, or other plants."),
    ("clock", "A clock is a device that shows the current time."),
    ("dictionary", "A dictionary is a book or resource that lists words in alphabetical order and explains their meanings."),
    ("wallet", "A wallet is a small, flat case for carrying money and cards."),
    ("bakery", "A bakery is a shop where bread, cakes, and pastries are made and sold."),
    ("neighbor", "A neighbor is a person who lives near you."),
    ("holiday", "A holiday is a day of celebration or rest when many people do not work or go to school."),
    ("mirror", "A mirror is a smooth, reflective surface, usually made of glass, in which you can see your reflection."),
    ("battery", "A battery is a device that stores energy and supplies electricity to things like phones and flashlights."),
    ("envelope", "An envelope is a flat paper cover used to hold and send a letter or card."),
    ("compass", "A compass is a tool with a magnetic needle that points north, which helps you find directions."),
    ("blanket", "A blanket is a large piece of warm fabric used to cover yourself, especially in bed."),
    ("oven", "An oven is an enclosed kitchen appliance used for baking, roasting, or heating food."),
    ("scissors", "Scissors are a cutting tool made of two sharp blades joined in the middle."),
    ("ticket", "A ticket is a paper or digital pass that lets you enter an event or travel on public transport."),
    ("helmet", "A helmet is a hard hat worn to protect your head."),
    ("vacation", "A vacation is a period of time away from work or school, often spent traveling or resting."),
    ("museum", "A museum is a building where objects of historical, scientific, or artistic interest are displayed."),
    ("password", "A password is a secret word or phrase used to get into an account or device."),
    ("receipt", "A receipt is a written record showing that something has been paid for."),
    ("sandwich", "A sandwich is food made of fillings such as cheese or vegetables placed between slices of bread."),
    ("hammer", "A hammer is a tool with a heavy head used for hitting nails."),
    ("pharmacy", "A pharmacy is a shop where medicines are prepared and sold."),
    ("volunteer", "A volunteer is a person who offers to do work or help without being paid."),
    ("habit", "A habit is something you do regularly, often without thinking about it."),
    ("deadline", "A deadline is the latest time or date by which something must be finished."),
    ("budget", "A budget is a plan for how much money you will earn and spend over a period of time."),
    ("forecast", "A forecast is a prediction of what is likely to happen, such as tomorrow's weather."),
    ("refrigerator", "A refrigerator is an appliance that keeps food and drinks cold so they stay fresh."),
    ("candle", "A candle is a stick of wax with a wick that gives off light when it burns."),
    ("island", "An island is a piece of land completely surrounded by water."),
    ("puzzle", "A puzzle is a game or problem that tests your skill or cleverness to solve."),
]

_CATEGORIES: List[Tuple[str, List[str]]] = [
    ("fruits", ["apple", "banana", "orange", "grape", "strawberry", "mango", "pear",
                "peach", "cherry", "pineapple", "watermelon", "kiwi", "plum", "lemon"]),
    ("vegetables", ["carrot", "broccoli", "spinach", "potato", "onion", "cucumber",
                    "lettuce", "cabbage", "celery", "cauliflower", "zucchini", "beet"]),
    ("animals", ["dog", "cat", "elephant", "lion", "tiger", "giraffe", "zebra", "horse",
                 "rabbit", "bear", "kangaroo", "dolphin", "monkey", "wolf", "deer"]),
    ("colors", ["red", "blue", "green", "yellow", "orange", "purple", "pink", "brown",
                "black", "white", "gray"]),
    ("musical instruments", ["piano", "guitar", "violin", "drums", "flute", "trumpet",
                             "cello", "clarinet", "harp", "saxophone"]),
    ("sports", ["soccer", "basketball", "tennis", "swimming", "baseball", "volleyball",
                "cycling", "golf", "hockey", "rugby", "badminton"]),
    ("vehicles", ["car", "bus", "bicycle", "train", "truck", "motorcycle", "airplane",
                  "boat", "scooter", "helicopter", "tram", "van"]),
    ("planets in our solar system", ["Mercury", "Venus", "Earth", "Mars", "Jupiter",
                                     "Saturn", "Uranus", "Neptune"]),
    ("shapes", ["circle", "square", "triangle", "rectangle", "oval", "pentagon",
                "hexagon", "octagon"]),
    ("kitchen utensils", ["spoon", "fork", "knife", "spatula", "whisk", "ladle",
                          "tongs", "peeler", "grater", "rolling pin"]),
    ("birds", ["sparrow", "eagle", "owl", "robin", "parrot", "penguin", "pigeon", "swan",
               "crow", "flamingo", "duck", "hawk"]),
    ("continents", ["Africa", "Antarctica", "Asia", "Australia", "Europe",
                    "North America", "South America"]),
    ("things you can find in a classroom", ["desk", "chair", "whiteboard", "pencil",
                                            "notebook", "ruler", "eraser", "backpack",
                                            "clock", "bookshelf"]),
]

_RHYMES: List[Tuple[str, List[str]]] = [
    ("cat", ["hat", "bat", "mat", "rat", "sat"]),
    ("cake", ["bake", "lake", "make", "take", "snake"]),
    ("light", ["night", "bright", "kite", "sight", "flight"]),
    ("day", ["play", "say", "way", "stay", "gray"]),
    ("tree", ["bee", "sea", "free", "knee", "key"]),
    ("ring", ["sing", "king", "wing", "thing", "spring"]),
    ("moon", ["spoon", "raccoon", "soon", "noon", "balloon"]),
    ("rain", ["train", "plain", "chain", "brain", "lane"]),
    ("bell", ["well", "shell", "tell", "smell", "spell"]),
    ("car", ["star", "far", "jar", "bar", "guitar"]),
    ("boat", ["coat", "goat", "note", "float", "throat"]),
    ("fun", ["sun", "run", "bun", "done", "one"]),
    ("bed", ["red", "head", "bread", "said", "fed"]),
    ("dog", ["log", "frog", "fog", "jog", "hog"]),
    ("pen", ["ten", "hen", "men", "then", "when"]),
    ("fox", ["box", "socks", "rocks", "clocks", "locks"]),
    ("blue", ["shoe", "true", "two", "glue", "zoo"]),
    ("chair", ["bear", "hair", "pair", "stair", "care"]),
    ("snow", ["glow", "grow", "slow", "throw", "know"]),
    ("hill", ["fill", "mill", "still", "will", "spill"]),
    ("book", ["cook", "look", "hook", "took", "brook"]),
    ("cold", ["gold", "bold", "hold", "told", "fold"]),
    ("nest", ["best", "rest", "test", "west", "vest"]),
    ("fish", ["dish", "wish", "swish", "squish"]),
]

_ADVICE: List[Tuple[str, str, List[str]]] = [
    ("staying focused", "stay focused", [
        "Put your phone in another room while you work so it can't distract you.",
        "Work in short blocks, like 25 minutes, followed by a 5-minute break.",
        "Write down the one task you want to finish before you start.",
        "Close the browser tabs you don't need for the current task.",
        "Take a short walk when you notice your attention fading.",
    ]),
    ("sleeping better", "sleep better", [
        "Try to go to bed and wake up at the same time every day.",
        "Keep your bedroom cool, dark, and quiet.",
        "Avoid screens for about an hour before bed.",
        "Limit caffeine in the afternoon and evening.",
        "Wind down with a calm routine, like reading or gentle stretching.",
    ]),
    ("saving money", "save money", [
        "Set aside a small amount automatically each time you get paid.",
        "Make a shopping list and stick to it.",
        "Cook at home more often instead of eating out.",
        "Review your subscriptions and cancel the ones you don't use.",
        "Wait a day before buying something you didn't plan for.",
    ]),
    ("learning a new language", "learn a new language", [
        "Practice a little every day rather than a lot once a week.",
        "Learn the most common words first.",
        "Listen to songs or podcasts in the language.",
        "Speak out loud, even if you make mistakes.",
        "Label objects around your home with their names in the new language.",
    ]),
    ("reducing stress", "reduce stress", [
        "Take a few slow, deep breaths when you feel tense.",
        "Go for a short walk outside.",
        "Break big tasks into small, manageable steps.",
        "Talk to a friend about what is on your mind.",
        "Make time for a hobby you enjoy.",
    ]),
    ("staying hydrated", "stay hydrated", [
        "Keep a refillable water bottle with you during the day.",
        "Drink a glass of water with every meal.",
        "Eat water-rich foods like cucumbers and oranges.",
        "Set gentle reminders on your phone to take a sip.",
        "Start your morning with a glass of water.",
    ]),
    ("studying for an exam", "study for an exam", [
        "Start early and spread your review over several days.",
        "Test yourself with practice questions instead of only rereading.",
        "Explain the key ideas out loud as if you were teaching a friend.",
        "Study in a quiet place without distractions.",
        "Get a good night's sleep before the exam.",
    ]),
    ("making new friends", "make new friends", [
        "Join a club or group built around something you enjoy.",
        "Ask people questions about themselves and listen closely.",
        "Say yes to invitations, even small ones.",
        "Volunteer for a cause you care about.",
        "Follow up with people you enjoyed meeting.",
    ]),
    ("keeping a tidy home", "keep a tidy home", [
        "Spend ten minutes tidying up every evening.",
        "Put things back right after you use them.",
        "Give every item a specific place where it belongs.",
        "Deal with mail and papers as soon as they arrive.",
        "Donate things you no longer use.",
    ]),
    ("being more productive", "be more productive", [
        "Plan your three most important tasks the night before.",
        "Do the hardest task first while your energy is high.",
        "Group similar small tasks together.",
        "Turn off notifications while you work.",
        "Take regular short breaks to recharge.",
    ]),
    ("staying active", "stay active", [
        "Take the stairs instead of the elevator.",
        "Go for a walk after meals.",
        "Stretch for a few minutes each morning.",
        "Find a sport or activity you genuinely enjoy.",
        "Stand up and move around every hour.",
    ]),
]

_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July",
           "August", "September", "October", "November", "December"]

# sentence parts: every subject is a singular noun phrase starting with a determiner
_SUBJECTS = ["My sister", "The teacher", "Our neighbor", "The old man", "A young girl",
             "The chef", "My friend", "The farmer", "His brother", "The student"]
_VERBS = [("likes", "like"), ("wants", "want"), ("needs", "need"), ("has", "have"),
          ("buys", "buy"), ("cleans", "clean"), ("carries", "carry"),
          ("paints", "paint"), ("borrows", "borrow"), ("finds", "find")]
_OBJECTS = ["a red bicycle", "the old wooden chair", "a small green lamp",
            "a new blue umbrella", "the heavy box", "a warm wool blanket",
            "a tiny glass jar", "the yellow kite", "a big straw hat",
            "the broken clock", "a shiny silver spoon", "a clay flower pot"]
_ADJECTIVES = ["tired", "happy", "at home", "ready", "hungry", "busy", "asleep", "outside"]
_ABILITIES = ["swim", "ride a bike", "cook pasta", "play the piano", "speak French",
              "drive a car"]


# ---------------------------------------------------------------------------
# derived banks (built once, deterministically, independent of the user seed)
# ---------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _statements() -> Tuple[Tuple[str, str], ...]:
    """(statement, question) pairs built from the sentence parts."""
    out = []
    for subj in _SUBJECTS:
        low = _lower_first(subj)
        for third, base in _VERBS:
            for obj in _OBJECTS:
                out.append((f"{subj} {third} {obj}.", f"Does {low} {base} {obj}?"))
        for adj in _ADJECTIVES:
            out.append((f"{subj} is {adj}.", f"Is {low} {adj}?"))
        for ability in _ABILITIES:
            out.append((f"{subj} can {ability}.", f"Can {low} {ability}?"))
    return tuple(out)


def _unique_lists(name: str, count: int, make: Callable[[random.Random], Tuple]) -> List[Tuple]:
    rng = _bank_rng(name)
    seen = set()
    out: List[Tuple] = []
    while len(out) < count:
        item = make(rng)
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


@lru_cache(maxsize=None)
def _number_lists() -> Tuple[Tuple[int, ...], ...]:
    def make(rng: random.Random) -> Tuple[int, ...]:
        hi = rng.choice([20, 100, 999])
        return tuple(rng.sample(range(1, hi + 1), rng.randint(4, 7)))

    return tuple(_unique_lists("numbers", 800, make))


@lru_cache(maxsize=None)
def _word_lists() -> Tuple[Tuple[str, ...], ...]:
    def make(rng: random.Random) -> Tuple[str, ...]:
        return tuple(rng.sample(_WORDS, rng.randint(3, 6)))

    return tuple(_unique_lists("words", 900, make))


def _pairs(name: str, small: range, big: range, n_big: int, cond=lambda a, b: True) -> List[Tuple[int, int]]:
    out = [(a, b) for a in small for b in small if cond(a, b)]
    seen = set(out)
    rng = _bank_rng(name)
    target = len(out) + n_big
    while len(out) < target:
        a, b = rng.choice(big), rng.choice(big)
        if cond(a, b) and (a, b) not in seen:
            seen.add((a, b))
            out.append((a, b))
    return out


# ---------------------------------------------------------------------------
# task families
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Family:
    name: str
    bases: Sequence
    templates: int
    render: Callable[[object, int, random.Random], _Rendered]

    @property
    def capacity(self) -> int:
        return len(self.bases) * self.templates


def _pick(rng: random.Random, options: Sequence[str], **kw) -> str:
    return rng.choice(options).format(**kw)


# --- arithmetic ------------------------------------------------------------

_ADD_T = ["What is {a} plus {b}?", "Add {a} and {b}.", "Calculate {a} + {b}.",
          "What do you get when you add {a} to {b}?", "Can you compute the sum of {a} and {b}?"]
_ADD_O = ["{a} plus {b} equals {r}.", "The sum of {a} and {b} is {r}.",
          "{a} + {b} = {r}.", "Adding {a} and {b} gives you {r}."]


def _r_add(base, t, rng):
    a, b = base
    return _ADD_T[t].format(a=a, b=b), "", _pick(rng, _ADD_O, a=a, b=b, r=a + b)


_SUB_T = ["What is {a} minus {b}?", "Subtract {b} from {a}.", "Calculate {a} - {b}.",
          "What do you get if you take {b} away from {a}?",
          "What is the difference between {a} and {b}?"]
_SUB_O = ["{a} minus {b} equals {r}.", "If you subtract {b} from {a}, you get {r}.",
          "{a} - {b} = {r}.", "Taking {b} away from {a} leaves {r}."]


def _r_sub(base, t, rng):
    a, b = base
    return _SUB_T[t].format(a=a, b=b), "", _pick(rng, _SUB_O, a=a, b=b, r=a - b)


_MUL_T = ["What is {a} times {b}?", "Multiply {a} by {b}.", "Calculate {a} × {b}.",
          "What is the product of {a} and {b}?", "How much is {a} multiplied by {b}?"]
_MUL_O = ["{a} times {b} equals {r}.", "The product of {a} and {b} is {r}.",
          "{a} × {b} = {r}.", "Multiplying {a} by {b} gives you {r}."]


def _r_mul(base, t, rng):
    a, b = base
    return _MUL_T[t].format(a=a, b=b), "", _pick(rng, _MUL_O, a=a, b=b, r=a * b)


_DIV_T = ["What is {a} divided by {b}?", "Divide {a} by {b}.", "Calculate {a} ÷ {b}.",
          "How many times does {b} go into {a}?"]
_DIV_O = ["{a} divided by {b} is {r}.", "{a} ÷ {b} = {r}.",
          "{b} goes into {a} exactly {r} times, so the answer is {r}."]


def _r_div(base, t, rng):
    b, q = base
    a = b * q
    return _DIV_T[t].format(a=a, b=b), "", _pick(rng, _DIV_O, a=a, b=b, r=q)


# --- numbers -----------------------------------------------------------------

_CMP_T = ["Which number is larger, {a} or {b}?", "Which is smaller: {a} or {b}?",
          "Is {a} greater than {b}?", "Is {a} less than {b}?"]


def _r_compare(base, t, rng):
    a, b = base
    hi, lo = max(a, b), min(a, b)
    instr = _CMP_T[t].format(a=a, b=b)
    if t == 0:
        out = _pick(rng, ["{hi} is larger than {lo}.", "The larger number is {hi}."], hi=hi, lo=lo)
    elif t == 1:
        out = _pick(rng, ["{lo} is smaller than {hi}.", "The smaller number is {lo}."], hi=hi, lo=lo)
    elif t == 2:
        out = f"Yes, {a} is greater than {b}." if a > b else f"No, {a} is less than {b}."
    else:
        out = f"Yes, {a} is less than {b}." if a < b else f"No, {a} is greater than {b}."
    return instr, "", out


_PARITY_T = ["Is {n} an even number?", "Is {n} odd or even?", "Is {n} an odd number?",
             "Tell me whether {n} is even or odd."]


def _r_parity(n, t, rng):
    even = n % 2 == 0
    word = "even" if even else "odd"
    reason = ("because it is divisible by 2" if even
              else "because it leaves a remainder of 1 when divided by 2")
    if t == 0:
        out = f"{'Yes' if even else 'No'}, {n} is {word} {reason}."
    elif t == 2:
        out = f"{'No' if even else 'Yes'}, {n} is {word} {reason}."
    else:
        out = f"{n} is an {word} number {reason}."
    return _PARITY_T[t].format(n=n), "", out


_SEQ_T = ["What comes next in the sequence {s}?", "Find the next number: {s}, ...",
          "Continue the pattern: {s}. What is the next number?"]


def _r_sequence(base, t, rng):
    start, step, length = base
    terms = [start + i * step for i in range(length)]
    nxt = start + length * step
    how = f"goes up by {step}" if step > 0 else f"goes down by {-step}"
    out = _pick(rng, ["The next number is {n}, because each number {h}.",
                      "Each number {h}, so the next one is {n}."], n=nxt, h=how)
    return _SEQ_T[t].format(s=", ".join(map(str, terms))), "", out


_EXT_T = ["What is the largest number in this list: {l}?",
          "Which is the smallest number here: {l}?",
          "Find the biggest number among {l}.",
          "Find the smallest number among {l}."]


def _r_extreme(base, t, rng):
    nums = _number_lists()[base]
    text = ", ".join(map(str, nums))
    if t in (0, 2):
        out = _pick(rng, ["The largest number in the list is {v}.", "The biggest one is {v}."],
                    v=max(nums))
    else:
        out = _pick(rng, ["The smallest number in the list is {v}.", "The smallest one is {v}."],
                    v=min(nums))
    return _EXT_T[t].format(l=text), "", out


_SORTNUM_T = [("Sort these numbers from smallest to largest: {l}.", ""),
              ("Put the following numbers in ascending order.", "{l}"),
              ("Arrange these numbers from largest to smallest: {l}.", ""),
              ("Sort the following numbers in descending order.", "{l}")]


def _r_sort_numbers(base, t, rng):
    nums = _number_lists()[base]
    text = ", ".join(map(str, nums))
    instr, inp = (s.format(l=text) for s in _SORTNUM_T[t])
    if t < 2:
        out = "From smallest to largest: " + ", ".join(map(str, sorted(nums))) + "."
    else:
        out = "From largest to smallest: " + ", ".join(map(str, sorted(nums, reverse=True))) + "."
    return instr, inp, out


_ROUND_T = ["Round {n} to the nearest {u}.", "What is {n} rounded to the nearest {u}?",
            "If you round {n} to the nearest {u}, what do you get?"]


def _r_round(base, t, rng):
    n, unit = base
    step = 10 if unit == "ten" else 100
    r = (n + step // 2) // step * step  # school rounding: halves go up
    out = _pick(rng, ["{n} rounded to the nearest {u} is {r}.",
                      "Rounded to the nearest {u}, {n} becomes {r}."], n=n, u=unit, r=r)
    return _ROUND_T[t].format(n=n, u=unit), "", out


# --- unit conversions ------------------------------------------------------

_CONV_T = ["Convert {v} {fu} to {tu}.", "How many {tu} are in {v} {fu}?",
           "What is {v} {fu} in {tu}?"]
_CONV_O = ["{v} {fu} is {r} {tu}.", "{v} {fu} equals {r} {tu}.",
           "There are {r} {tu} in {v} {fu}."]

def _unit_name(value: Fraction, singular: str, plural: str) -> str:
    return singular if abs(value) == 1 else plural


def _conv_table(kind: str):
    """Rows of (from singular, from plural, to singular, to plural, factor, values)."""
    def vals(seq):
        return [Fraction(v) for v in seq]

    half = [Fraction(k, 2) for k in range(1, 21, 2)]
    if kind == "length":
        return [
            ("kilometer", "kilometers", "meter", "meters", Fraction(1000), vals(range(1, 41)) + half),
            ("meter", "meters", "kilometer", "kilometers", Fraction(1, 1000), vals(range(100, 10000, 100))),
            ("meter", "meters", "centimeter", "centimeters", Fraction(100), vals(range(1, 101))),
            ("centimeter", "centimeters", "meter", "meters", Fraction(1, 100), vals(range(10, 1000, 10))),
        ]
    if kind == "time":
        return [
            ("hour", "hours", "minute", "minutes", Fraction(60), vals(range(1, 25)) + half),
            ("minute", "minutes", "hour", "hours", Fraction(1, 60), vals(range(15, 601, 15))),
            ("minute", "minutes", "second", "seconds", Fraction(60), vals(range(1, 61))),
            ("day", "days", "hour", "hours", Fraction(24), vals(range(1, 15))),
            ("week", "weeks", "day", "days", Fraction(7), vals(range(1, 21))),
        ]
    if kind == "mass":
        return [
            ("kilogram", "kilograms", "gram", "grams", Fraction(1000), vals(range(1, 51)) + half),
            ("gram", "grams", "kilogram", "kilograms", Fraction(1, 1000), vals(range(50, 5001, 50))),
        ]
    raise KeyError(kind)


def _conv_bases(kind: str) -> List[Tuple[int, Fraction]]:
    return [(i, v) for i, row in enumerate(_conv_table(kind)) for v in row[5]]


def _make_conv_render(kind: str):
    table = _conv_table(kind)

    def render(base, t, rng):
        i, v = base
        fs, fp, ts, tp, factor, _ = table[i]
        r = v * factor
        fu, tu = _unit_name(v, fs, fp), _unit_name(r, ts, tp)
        vs, rs = _fmt_exact(v), _fmt_exact(r)
        instr = _CONV_T[t].format(v=vs, fu=fu, tu=tp)
        return instr, "", _pick(rng, _CONV_O, v=vs, fu=fu, r=rs, tu=tu)

    return render


_TEMP_T = ["Convert {v} degrees {f} to {to}.", "What is {v} degrees {f} in {to}?",
           "If it is {v} degrees {f} outside, what is that in {to}?"]


def _r_temperature(base, t, rng):
    direction, v = base
    v = Fraction(v)
    if direction == "C":
        f_name, to_name = "Celsius", "Fahrenheit"
        r = v * Fraction(9, 5) + 32
        formula = "F = C × 9/5 + 32"
    else:
        f_name, to_name = "Fahrenheit", "Celsius"
        r = (v - 32) * Fraction(5, 9)
        formula = "C = (F - 32) × 5/9"
    rs, exact = _round_half_up(r, 1)
    vs = _fmt_exact(v)
    deg_v = "degree" if abs(v) == 1 else "degrees"
    deg_r = "degree" if exact and abs(r) == 1 else "degrees"
    approx = "" if exact else "about "
    out = _pick(rng, ["{v} {dv} {f} is {a}{r} {dr} {to}.",
                      "Using {fm}, {v} {dv} {f} is {a}{r} {dr} {to}."],
                v=vs, dv=deg_v, f=f_name, a=approx, r=rs, dr=deg_r, to=to_name, fm=formula)
    return _TEMP_T[t].format(v=vs, f=f_name, to=to_name), "", out


# --- words and letters -----------------------------------------------------

_REV_T = [('Reverse the word "{w}".', ""), ("Write this word backwards.", "{w}"),
          ('What is "{w}" spelled backwards?', ""), ("Reverse the letters of the following word.", "{w}")]


def _r_reverse(w, t, rng):
    instr, inp = (s.format(w=w) for s in _REV_T[t])
    out = _pick(rng, ['"{w}" reversed is "{r}".', 'Spelled backwards, "{w}" becomes "{r}".',
                      'Sure! The reversed word is "{r}".'], w=w, r=w[::-1])
    return instr, inp, out


_SPELL_T = [('Spell the word "{w}" letter by letter.', ""), ("Spell out this word for me.", "{w}"),
            ('How do you spell "{w}"?', ""), ("Please spell the following word one letter at a time.", "{w}")]


def _r_spell(w, t, rng):
    instr, inp = (s.format(w=w) for s in _SPELL_T[t])
    letters = "-".join(w.upper())
    out = _pick(rng, ['Sure! "{w}" is spelled {l}.', "{l}. That spells \"{w}\".",
                      'It is spelled {l}.'], w=w, l=letters)
    return instr, inp, out


_LEN_T = ['How many letters are in the word "{w}"?', "Count the letters in this word.",
          'How many letters does "{w}" have?']


def _r_word_length(w, t, rng):
    instr = _LEN_T[t].format(w=w)
    inp = w if t == 1 else ""
    out = _pick(rng, ['The word "{w}" has {n} letters.', '"{w}" is made up of {n} letters.',
                      'There are {n} letters in "{w}".'], w=w, n=len(w))
    return instr, inp, out


@lru_cache(maxsize=None)
def _letter_bases() -> Tuple[Tuple[str, str], ...]:
    out = []
    for w in _WORDS:
        for ch in sorted(set(w)):
            out.append((w, ch))
    return tuple(out)


_OCC_T = ['How many times does the letter "{c}" appear in "{w}"?',
          'Count how often the letter "{c}" occurs in the word "{w}".',
          'How many "{c}"s are in the word "{w}"?']


def _r_letter_occurrence(base, t, rng):
    w, c = base
    k = w.count(c)
    out = _pick(rng, ['The letter "{c}" appears {k} in "{w}".',
                      'In "{w}", the letter "{c}" shows up {k}.'], c=c, w=w, k=_times(k))
    return _OCC_T[t].format(c=c, w=w), "", out


_FL_T = ['What is the {p} letter of the word "{w}"?', 'Which letter does "{w}" {v} with?',
         'Tell me the {p} letter of "{w}".']


def _r_first_last(base, t, rng):
    w, pos = base
    p = "first" if pos == 0 else "last"
    v = "start" if pos == 0 else "end"
    ch = w[0] if pos == 0 else w[-1]
    out = _pick(rng, ['The {p} letter of "{w}" is "{c}".', '"{w}" {v}s with the letter "{c}".'],
                p=p, w=w, c=ch, v=v)
    return _FL_T[t].format(p=p, w=w, v=v), "", out


_ALPHA_T = [("Sort these words in alphabetical order: {l}.", ""),
            ("Put the following words in alphabetical order.", "{l}"),
            ("Arrange this list alphabetically: {l}.", ""),
            ("Alphabetize the following list of words.", "{l}")]


def _r_alphabetical(base, t, rng):
    words = _word_lists()[base]
    instr, inp = (s.format(l=", ".join(words)) for s in _ALPHA_T[t])
    out = _pick(rng, ["Here they are in alphabetical order: {s}.",
                      "In alphabetical order: {s}.", "Sure! Sorted alphabetically: {s}."],
                s=", ".join(sorted(words)))
    return instr, inp, out


_WC_T = [("How many words are in this sentence?", "{s}"), ('Count the words in "{s}"', ""),
         ("Tell me the number of words in the following sentence.", "{s}")]


def _r_word_count(idx, t, rng):
    sentence = _statements()[idx][0]
    instr, inp = (s.format(s=sentence) for s in _WC_T[t])
    n = len(sentence.split())
    out = _pick(rng, ["The sentence has {n} words.", "There are {n} words in that sentence.",
                      "That sentence contains {n} words."], n=n)
    return instr, inp, out


_UP_T = ["Convert the following sentence to uppercase.", "Rewrite this sentence in all capital letters.",
         "Make every letter in this sentence uppercase."]


def _r_uppercase(idx, t, rng):
    sentence = _statements()[idx][0]
    out = _pick(rng, ["Here it is in uppercase: {u}", "{u}", "Sure! {u}"], u=sentence.upper())
    return _UP_T[t], sentence, out


_LOW_T = ["Convert the following text to lowercase.", "Rewrite this sentence using only lowercase letters.",
          "Make this sentence lowercase."]


def _r_lowercase(idx, t, rng):
    sentence = _statements()[idx][0]
    out = _pick(rng, ["Here it is in lowercase: {l}", "{l}", "Sure! {l}"], l=sentence.lower())
    return _LOW_T[t], sentence.upper(), out


_Q_T = ["Rewrite this sentence as a question.", "Turn the following statement into a yes/no question.",
        "Change this sentence into a question."]


def _r_question(idx, t, rng):
    statement, question = _statements()[idx]
    out = _pick(rng, ["{q}", "Here it is as a question: {q}", "Sure! {q}"], q=question)
    return _Q_T[t], statement, out


_PL_T = ['What is the plural of "{w}"?', 'Give me the plural form of the word "{w}".',
         'How do you write "{w}" in the plural?']


def _r_plural(base, t, rng):
    w, p = base
    if w == p:
        out = f'The plural of "{w}" is also "{p}"; the word stays the same.'
    else:
        out = _pick(rng, ['The plural of "{w}" is "{p}".', 'One {w}, two {p}. The plural is "{p}".'],
                    w=w, p=p)
    return _PL_T[t].format(w=w), "", out


_ANT_T = ['What is the opposite of "{w}"?', 'Give me an antonym for "{w}".',
          'What word means the opposite of "{w}"?']


def _r_antonym(base, t, rng):
    w, a = base
    # hedged phrasings: several words have more than one valid opposite
    out = _pick(rng, ['A common opposite of "{w}" is "{a}".', 'One opposite of "{w}" is "{a}".',
                      'An antonym of "{w}" is "{a}".'], w=w, a=a)
    return _ANT_T[t].format(w=w), "", out


_RHY_T = ['Give me a word that rhymes with "{w}".', 'What is a word that rhymes with "{w}"?',
          'Name two words that rhyme with "{w}".', 'Can you suggest a few words that rhyme with "{w}"?']


def _r_rhyme(base, t, rng):
    w, options = base
    k = 1 if t < 2 else (2 if t == 2 else 3)
    chosen = rng.sample(list(options), k)
    quoted = [f'"{c}"' for c in chosen]
    if k == 1:
        out = _pick(rng, ['"{c}" rhymes with "{w}".', 'A word that rhymes with "{w}" is "{c}".'],
                    c=chosen[0], w=w)
    else:
        out = f'Sure! Words that rhyme with "{w}" include {_join(quoted)}.'
    return _RHY_T[t].format(w=w), "", out


_DEF_T = ['What does "{w}" mean?', 'Define the word "{w}".', 'What is the meaning of "{w}"?',
          'Explain what "{w}" means in one sentence.']


def _r_definition(base, t, rng):
    w, d = base
    out = _pick(rng, ["{d}", "Sure! {d}", "Good question! {d}"], d=d)
    return _DEF_T[t].format(w=w), "", out


# --- calendar ---------------------------------------------------------------

_DAY_T = {
    "after": ["If today is {d}, what day will it be in {k} {u}?",
              "What day of the week is {k} {u} after {d}?",
              "Today is {d}. Which day will it be {k} {u} from now?"],
    "before": ["If today is {d}, what day was it {k} {u} ago?",
               "What day of the week is {k} {u} before {d}?",
               "Today is {d}. Which day was it {k} {u} ago?"],
}


def _r_day(base, t, rng):
    d, k, direction = base
    u = "day" if k == 1 else "days"
    sign = 1 if direction == "after" else -1
    res = _DAYS[(d + sign * k) % 7]
    instr = _DAY_T[direction][t].format(d=_DAYS[d], k=k, u=u)
    if direction == "after":
        out = _pick(rng, ["{k} {u} after {d} it will be {r}.", "It will be {r}."],
                    k=k, u=u, d=_DAYS[d], r=res)
    else:
        out = _pick(rng, ["{k} {u} before {d} it was {r}.", "It was {r}."],
                    k=k, u=u, d=_DAYS[d], r=res)
    if k >= 7:
        weeks, rest = divmod(k, 7)
        w = f"{weeks} week" + ("s" if weeks > 1 else "")
        if rest:
            out += f" ({k} days is {w} and {rest} day{'s' if rest > 1 else ''}.)"
        else:
            out += f" ({k} days is exactly {w}, so it is the same day of the week.)"
    return instr, "", out


_MONTH_T = {
    "after": ["What month is {k} {u} after {m}?", "If it is {m} now, what month will it be in {k} {u}?",
              "Which month comes {k} {u} after {m}?"],
    "before": ["What month is {k} {u} before {m}?", "If it is {m} now, what month was it {k} {u} ago?",
               "Which month was {k} {u} before {m}?"],
}


def _r_month(base, t, rng):
    m, k, direction = base
    u = "month" if k == 1 else "months"
    sign = 1 if direction == "after" else -1
    res = _MONTHS[(m + sign * k) % 12]
    instr = _MONTH_T[direction][t].format(m=_MONTHS[m], k=k, u=u)
    word = "after" if direction == "after" else "before"
    out = _pick(rng, ["{k} {u} {w} {m} is {r}.", "The answer is {r}."],
                k=k, u=u, w=word, m=_MONTHS[m], r=res)
    return instr, "", out


# --- knowledge and conversation -------------------------------------------

_CAP_T = {
    "capital": ["What is the capital of {c}?", "Which city is the capital of {c}?",
                "Name the capital city of {c}."],
    "country": ["{k} is the capital of which country?", "Which country has {k} as its capital?",
                "Of which country is {k} the capital?"],
}


def _r_capital(base, t, rng):
    (country, city), mode = base
    instr = _CAP_T[mode][t].format(c=country, k=city)
    if mode == "capital":
        out = _pick(rng, ["The capital of {c} is {k}.", "{k} is the capital of {c}."], c=country, k=city)
    else:
        out = _pick(rng, ["{k} is the capital of {c}.", "That would be {c}; {k} is its capital city."], c=country, k=city)
    return instr, "", out


_MIX_T = ["What color do you get when you mix {a} and {b} paint?",
          "If I mix {a} and {b} paint, what color will I get?",
          "What happens when you combine {a} and {b} paint?",
          "Which color comes from mixing {a} and {b} paint?"]


def _r_color_mix(base, t, rng):
    a, b, r = base
    article = "an" if r[0] in "aeiou" else "a"
    out = _pick(rng, ["Mixing {a} and {b} paint gives you {r}.",
                      "You get {r} when you mix {a} and {b} paint.",
                      "Combining {a} and {b} paint makes {art} {r} color."],
                a=a, b=b, r=r, art=article)
    return _MIX_T[t].format(a=a, b=b), "", out


_LIST_T = ["List {k} {c}.", "Name {k} {c}.", "Can you give me {k} examples of {c}?",
           "Tell me {k} {c}, please."]


def _r_list(base, t, rng):
    (cat, items), k = base
    chosen = rng.sample(items, k)
    kw = _NUMBER_WORDS[k]
    out = _pick(rng, ["Here are {kw} {c}: {l}.", "Sure! {L}.", "Some examples are {l}."],
                kw=kw, c=cat, l=_join(chosen), L=_upper_first(_join(chosen)))
    return _LIST_T[t].format(k=kw if t % 2 else k, c=cat), "", out


_ADV_T = ["Give me a tip for {g}.", "What is a good way to {i}?", "Can you share some advice on {g}?",
          "How can I {i}?", "I want to {i}. Any suggestions?"]


def _r_advice(base, t, rng):
    g, i, tips = base
    a, b = rng.sample(tips, 2)
    out = _pick(rng, ["Here is a tip: {a}", "Sure! {a}", "Great question! {a} Also, {b2}",
                      "Here are two ideas. {a} {b}"], a=a, b=b, b2=_lower_first(b))
    return _ADV_T[t].format(g=g, i=i), "", out


# ---------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _families() -> Tuple[_Family, ...]:
    n_st = len(_statements())
    pl = list(_PLURALS)
    ant = [(a, b) for a, b in _ANTONYM_PAIRS] + [(b, a) for a, b in _ANTONYM_PAIRS]
    mixes = [(a, b, r) for a, b, r in _COLOR_MIXES] + [(b, a, r) for a, b, r in _COLOR_MIXES]
    seq_bases = []
    for start in range(1, 41):
        for step in list(range(1, 11)) + list(range(-10, 0)):
            for length in (4, 5):
                if start + length * step > 0:
                    seq_bases.append((start, step, length))
    round_bases = ([(n, "ten") for n in range(11, 1000) if n % 10]
                   + [(n, "hundred") for n in range(101, 3000) if n % 100])
    round_bases = [round_bases[i] for i in sorted(_bank_rng("round").sample(range(len(round_bases)), 1200))]
    fams = [
        _Family("addition", _pairs("add", range(1, 21), range(10, 1000), 1200), len(_ADD_T), _r_add),
        _Family("subtraction", _pairs("sub", range(1, 21), range(5, 1000), 1000, lambda a, b: a >= b),
                len(_SUB_T), _r_sub),
        _Family("multiplication", _pairs("mul", range(2, 13), range(2, 40), 300), len(_MUL_T), _r_mul),
        _Family("division", [(b, q) for b in range(2, 13) for q in range(2, 21)], len(_DIV_T), _r_div),
        _Family("compare_numbers", _pairs("cmp", range(1, 21), range(1, 1000), 1500, lambda a, b: a != b),
                len(_CMP_T), _r_compare),
        _Family("even_odd", list(range(0, 1001)), len(_PARITY_T), _r_parity),
        _Family("number_sequence", seq_bases, len(_SEQ_T), _r_sequence),
        _Family("largest_smallest", list(range(len(_number_lists()))), len(_EXT_T), _r_extreme),
        _Family("sort_numbers", list(range(len(_number_lists()))), len(_SORTNUM_T), _r_sort_numbers),
        _Family("rounding", round_bases, len(_ROUND_T), _r_round),
        _Family("length_conversion", _conv_bases("length"), len(_CONV_T), _make_conv_render("length")),
        _Family("time_conversion", _conv_bases("time"), len(_CONV_T), _make_conv_render("time")),
        _Family("mass_conversion", _conv_bases("mass"), len(_CONV_T), _make_conv_render("mass")),
        _Family("temperature_conversion",
                [("C", c) for c in range(-40, 101)] + [("F", f) for f in range(-40, 213)],
                len(_TEMP_T), _r_temperature),
        _Family("reverse_word", list(_WORDS), len(_REV_T), _r_reverse),
        _Family("spell_word", list(_WORDS), len(_SPELL_T), _r_spell),
        _Family("word_length", list(_WORDS), len(_LEN_T), _r_word_length),
        _Family("letter_occurrence", list(_letter_bases()), len(_OCC_T), _r_letter_occurrence),
        _Family("first_last_letter", [(w, p) for w in _WORDS for p in (0, 1)], len(_FL_T), _r_first_last),
        _Family("alphabetical_order", list(range(len(_word_lists()))), len(_ALPHA_T), _r_alphabetical),
        _Family("word_count", list(range(n_st)), len(_WC_T), _r_word_count),
        _Family("uppercase", list(range(n_st)), len(_UP_T), _r_uppercase),
        _Family("lowercase", list(range(n_st)), len(_LOW_T), _r_lowercase),
        _Family("make_question", list(range(n_st)), len(_Q_T), _r_question),
        _Family("plural", pl, len(_PL_T), _r_plural),
        _Family("antonym", ant, len(_ANT_T), _r_antonym),
        _Family("rhyme", [(w, tuple(r)) for w, r in _RHYMES], len(_RHY_T), _r_rhyme),
        _Family("definition", list(_DEFINITIONS), len(_DEF_T), _r_definition),
        _Family("day_of_week",
                [(d, k, s) for d in range(7) for k in range(1, 31) for s in ("after", "before")],
                3, _r_day),
        _Family("month_offset",
                [(m, k, s) for m in range(12) for k in range(1, 25) for s in ("after", "before")],
                3, _r_month),
        _Family("capital_city", [(c, mode) for c in _CAPITALS for mode in ("capital", "country")],
                3, _r_capital),
        _Family("color_mixing", mixes, len(_MIX_T), _r_color_mix),
        _Family("list_items",
                [(c, k) for c in _CATEGORIES for k in range(2, 7) if k <= len(c[1])],
                len(_LIST_T), _r_list),
        _Family("advice", list(_ADVICE), len(_ADV_T), _r_advice),
    ]
    names = [f.name for f in fams]
    assert len(names) == len(set(names))
    return tuple(fams)


def builtin_families() -> List[str]:
    """Names of the task families used by :func:`builtin_instructions`."""
    return [f.name for f in _families()]


def builtin_capacity() -> int:
    """Largest ``n`` that :func:`builtin_instructions` can produce without duplicates."""
    return sum(f.capacity for f in _families())


# ---------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------

def _weight(fam: _Family) -> float:
    # proportional to how many distinct items a family has, clipped so that
    # tiny tables are not drowned out and huge ones do not dominate.
    return float(min(max(len(fam.bases), 30), 250))


def _allocate(n: int, fams: Sequence[_Family]) -> List[int]:
    """Split ``n`` over families by weight (water-filling, capped by capacity)."""
    quotas = [0] * len(fams)
    caps = [f.capacity for f in fams]
    weights = [_weight(f) for f in fams]
    open_ = list(range(len(fams)))
    remaining = n
    while remaining > 0 and open_:
        total_w = sum(weights[i] for i in open_)
        ideal = {i: remaining * weights[i] / total_w for i in open_}
        full = [i for i in open_ if caps[i] - quotas[i] <= ideal[i]]
        if full:
            for i in full:
                remaining -= caps[i] - quotas[i]
                quotas[i] = caps[i]
            open_ = [i for i in open_ if i not in full]
            continue
        floors = {i: int(ideal[i]) for i in open_}
        for i in open_:
            quotas[i] += floors[i]
        left = remaining - sum(floors.values())
        # largest remainders first; index order breaks ties deterministically
        order = sorted(open_, key=lambda i: (-(ideal[i] - floors[i]), i))
        for i in order[:left]:
            quotas[i] += 1
        remaining = 0
    return quotas


def _draw(fam: _Family, quota: int, rng: random.Random) -> List[Tuple[object, int]]:
    """Pick ``quota`` distinct (base, template) pairs, covering distinct bases first."""
    m, T = len(fam.bases), fam.templates
    picks: List[Tuple[object, int]] = []
    offsets: Dict[int, int] = {}
    rnd = 0
    while len(picks) < quota:
        need = min(quota - len(picks), m)
        idxs = rng.sample(range(m), need)
        for j in idxs:
            if j not in offsets:
                offsets[j] = rng.randrange(T)
            picks.append((fam.bases[j], (offsets[j] + rnd) % T))
        rnd += 1
    return picks


def builtin_instructions(n: int, seed: int = 0, return_family: bool = False) -> List[Dict[str, str]]:
    """Generate ``n`` instruction records written by this project.

    Each record is ``{"instruction": str, "input": str, "output": str}``
    (plus ``"family": str`` when ``return_family`` is true).  The result is
    deterministic for a given ``(n, seed)``, interleaves all task families,
    and never repeats an ``instruction``+``input`` pair.

    Raises:
        ValueError: if ``n`` is negative, not an integer, or larger than
            :func:`builtin_capacity`.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    cap = builtin_capacity()
    if n > cap:
        raise ValueError(
            f"n={n} exceeds the number of unique records the built-in generator can produce ({cap})"
        )
    rng = random.Random(seed)
    fams = _families()
    records: List[Dict[str, str]] = []
    seen = set()
    for fam, quota in zip(fams, _allocate(n, fams)):
        for base, t in _draw(fam, quota, rng):
            instr, inp, out = fam.render(base, t, rng)
            key = (instr, inp)
            if key in seen:  # pragma: no cover - guarded by tests
                raise RuntimeError(f"duplicate built-in record in family {fam.name!r}: {key!r}")
            seen.add(key)
            rec = {"instruction": instr, "input": inp, "output": out}
            if return_family:
                rec["family"] = fam.name
            records.append(rec)
    rng.shuffle(records)
    return records


def builtin_splits(sizes: Mapping[str, int], seed: int = 0,
                   return_family: bool = False) -> Dict[str, List[Dict[str, str]]]:
    """Disjoint named splits, e.g. ``{"plant": 400, "defense": 800, "test": 100}``.

    All splits are sliced from a single :func:`builtin_instructions` call, so
    no ``instruction``+``input`` pair appears in more than one split.
    """
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"split {name!r} must have a non-negative integer size, got {size!r}")
    total = sum(sizes.values())
    records = builtin_instructions(total, seed=seed, return_family=return_family)
    out: Dict[str, List[Dict[str, str]]] = {}
    pos = 0
    for name, size in sizes.items():
        out[name] = records[pos:pos + size]
        pos += size
    return out
