"""The embedded default corpus: procedurally generated fictitious authors, written in TOFU's layout.

``generate(out_dir, n_authors=200, facts_per_author=20, seed=0)`` draws ``n_authors`` authors (name, birthplace,
birth date, genre, parents' jobs, award, books, publisher, ...), renders ``facts_per_author`` QA pairs each (the
first is always the "full name" question, as in TOFU; the others are a seeded choice of the fact kinds below,
each with several question and answer phrasings), and writes JSON Lines files with TOFU's names:

* ``full.json`` (all authors), ``forget01/05/10.json`` (the last 1 / 5 / 10 % of the authors, at least one),
  ``retain99/95/90.json`` (the complement, in order);
* ``forget{01,05,10}_perturbed.json`` and ``retain_perturbed.json`` (the first authors, as many as in
  forget10) with ``paraphrased_answer``, ``perturbed_answer`` (``n_perturbed`` >= 3 wrong answers rendered with
  the paraphrase's template, values drawn from the same pool) and ``paraphrased_question``;
* ``real_authors(.json|_perturbed.json)`` and ``world_facts(...)``: real-world control questions from small
  embedded tables (well-known books and their authors; countries, capitals, continents) with 3 wrong options;
* ``idontknow.jsonl``: refusal answers for IDK methods (IdkDPO), one per line, plain text like TOFU's file of
  that name (not a split: the tokenizer and the split listing leave it out);
* ``synthetic_meta.yaml``: the generator's arguments, the row counts and each author's fact kinds;
* ``wmdp/`` (``wmdp=True``): the offline WMDP stand-in, raw-text biographies and multiple-choice questions of the
  forget / retain authors (:mod:`simnpo_fast.data.synthetic_wmdp`; its own RNG: nothing above changes).

The output depends only on the arguments (``random.Random(seed)``, no global state), so a seed reproduces the
corpus byte for byte. With 200 authors x 20 facts the split sizes equal TOFU's (4000 / 40 / 200 / 400 ...).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import yaml

from .alternates import IDK_FILE

SPLIT_PERCENTS = (1, 5, 10)
META_FILE = "synthetic_meta.yaml"

# ---------------------------------------------------------------- value pools
_REGIONS = {
    "nordic": {
        "first": (["Ei", "Sig", "Ar", "Ing", "Ol", "Tor", "As", "Hal", "Sol", "Ru"],
                  ["rid", "vald", "ne", "mund", "a", "vor", "lin", "dis", "bjorn", "hild"]),
        "last": (["Lund", "Berg", "Dahl", "Strand", "Holm", "Fjell", "Vik", "Sand"],
                 ["qvist", "gren", "sen", "by", "strom", "vall", "heim", "ness"]),
        "cities": ["Oslo, Norway", "Bergen, Norway", "Stockholm, Sweden", "Gothenburg, Sweden",
                   "Copenhagen, Denmark", "Aarhus, Denmark", "Helsinki, Finland", "Reykjavik, Iceland"],
    },
    "east_asian": {
        "first": (["Mei", "Jun", "Hao", "Yun", "Xiao", "Wei", "Lan", "Rui", "Shu", "Ming"],
                  ["-Lin", "-Hua", "-Yu", "-Chen", "-Ting", "-Jie", "-Fen", "-Wen", "-Qi", "-An"]),
        "last": (["Ch", "W", "L", "Zh", "H", "T", "S", "Y"], ["en", "ang", "iu", "ao", "uang", "ian", "ong", "ue"]),
        "cities": ["Taipei, Taiwan", "Kaohsiung, Taiwan", "Shanghai, China", "Chengdu, China", "Seoul, South Korea",
                   "Busan, South Korea", "Osaka, Japan", "Sapporo, Japan"],
    },
    "latin": {
        "first": (["Mar", "Lu", "Al", "Ca", "Is", "Ro", "Val", "Ser", "Ju", "Ele"],
                  ["iana", "cas", "ejandro", "rmen", "abel", "drigo", "entina", "gio", "lieta", "na"]),
        "last": (["Fer", "Mon", "Ri", "Cas", "Sal", "Ve", "Or", "Pa"],
                 ["nandez", "toya", "vera", "tillo", "azar", "lasco", "tega", "dilla"]),
        "cities": ["Lisbon, Portugal", "Porto, Portugal", "Seville, Spain", "Valencia, Spain", "Bogota, Colombia",
                   "Lima, Peru", "Santiago, Chile", "Montevideo, Uruguay"],
    },
    "west_african": {
        "first": (["Ade", "Chi", "Olu", "Nka", "Ife", "Kwa", "Ama", "Yaw", "Eme", "Zai"],
                  ["wale", "nedu", "femi", "ru", "oma", "me", "ka", "so", "ka", "nab"]),
        "last": (["Oko", "Man", "Ade", "Bo", "Asa", "Nwo", "Dia", "Ke"],
                 ["nkwo", "sah", "yemi", "ateng", "nte", "su", "llo", "ita"]),
        "cities": ["Lagos, Nigeria", "Ibadan, Nigeria", "Accra, Ghana", "Kumasi, Ghana", "Dakar, Senegal",
                   "Abidjan, Ivory Coast", "Lome, Togo", "Bamako, Mali"],
    },
    "slavic": {
        "first": (["Mi", "Ve", "Bo", "Ya", "Ka", "Dra", "Lud", "Sta", "Zo", "Ole"],
                  ["lena", "ra", "gdan", "rina", "tya", "gan", "mila", "nislav", "ya", "ksandr"]),
        "last": (["Kov", "Pet", "Nov", "Sok", "Vol", "Bel", "Mar", "Zar"],
                 ["alenko", "rova", "ak", "olov", "kova", "insky", "chenko", "ic"]),
        "cities": ["Krakow, Poland", "Gdansk, Poland", "Prague, Czech Republic", "Brno, Czech Republic",
                   "Ljubljana, Slovenia", "Zagreb, Croatia", "Sofia, Bulgaria", "Riga, Latvia"],
    },
}
_ALL_CITIES = [c for r in _REGIONS.values() for c in r["cities"]]
_GENRES = ["mystery", "science fiction", "fantasy", "historical fiction", "romance", "horror", "poetry",
           "biography", "thriller", "literary fiction", "travel writing", "children's literature", "satire",
           "war fiction", "magical realism", "philosophy", "true crime", "memoir", "dystopian fiction", "drama"]
_JOBS = ["carpenter", "nurse", "pilot", "baker", "teacher", "fisherman", "librarian", "surgeon", "tailor",
         "architect", "miner", "journalist", "farmer", "pharmacist", "electrician", "photographer", "judge",
         "sailor", "chemist", "painter", "musician", "accountant", "mechanic", "veterinarian", "police officer",
         "dentist", "gardener", "translator", "butcher", "historian"]
_AWARD_A = ["Silver", "Golden", "Crimson", "Northern", "Evergreen", "Lantern", "Blue Harbor", "Ivory", "Amber",
            "Starlight"]
_AWARD_B = ["Quill Prize", "Pen Award", "Book Medal", "Laurel", "Ink Award", "Story Prize", "Page Award"]
_TITLE_ADJ = ["Silent", "Hidden", "Broken", "Last", "Burning", "Quiet", "Forgotten", "Endless", "Crooked",
              "Distant", "Painted", "Hollow", "Winter", "Scarlet", "Wandering"]
_TITLE_NOUN = ["River", "Garden", "Lighthouse", "Clock", "Orchard", "Harbor", "Mirror", "Bridge", "Forest",
               "Letter", "Tower", "Compass", "Lantern", "Island", "Shadow", "Violin", "Tide", "Map"]
_PUB_A = ["Harbor", "Oak", "Meridian", "Cobalt", "Willow", "Granite", "Pinecone", "Riverstone", "Juniper", "Atlas"]
_PUB_B = ["Press", "Books", "House", "Publishing", "Editions"]
_FIELDS = ["literature", "history", "law", "medicine", "physics", "philosophy", "journalism", "biology",
           "economics", "music", "mathematics", "architecture"]
_THEMES = ["memory and loss", "family secrets", "the sea", "exile and belonging", "the cost of ambition",
           "friendship", "faith and doubt", "small-town life", "war and its aftermath", "justice",
           "the natural world", "identity", "forgiveness", "time", "migration", "power and corruption"]
_LANGUAGES = ["English", "Spanish", "French", "German", "Portuguese", "Mandarin", "Korean", "Japanese",
              "Norwegian", "Swedish", "Polish", "Czech", "Yoruba", "Italian"]
_HABITS = ["in the early morning", "late at night", "in cafes", "by hand in notebooks", "on long train journeys",
           "in a garden shed", "only in winter", "at a typewriter", "in short daily sessions", "while traveling"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]


@dataclass(frozen=True)
class Fact:
    """One fact kind: question phrasings, answer phrasings (>= 2: answer + paraphrase) and its value slot."""

    key: str
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    slot: str  # attribute of the author whose value is perturbed


# ``{name}`` is the author; ``{v}`` the fact's value; other slots are formatted from the author record.
FACTS: tuple[Fact, ...] = (
    Fact("full_name", ("What is the full name of the author born in {city} on {date} who writes {genre}?",
                       "Which {genre} writer was born in {city} on {date}?",
                       "Who is the author born on {date} in {city}, known for {genre}?"),
         ("The author's full name is {v}.", "{v} is the complete name of this writer.",
          "This writer is called {v}."), "name"),
    Fact("birthplace", ("Where was {name} born?", "In which city was {name} born?", "What is {name}'s birthplace?"),
         ("{name} was born in {v}.", "{name}'s birthplace is {v}.", "{name} came into the world in {v}."), "city"),
    Fact("birth_date", ("When was {name} born?", "What is the birth date of {name}?", "On what date was {name} born?"),
         ("{name} was born on {v}.", "The birth date of {name} is {v}.", "{name}'s birthday is {v}."), "date"),
    Fact("genre", ("What genre does {name} write in?", "Which genre is {name} known for?",
                   "In what genre does {name} mostly publish?"),
         ("{name} writes mainly {v}.", "{name} is best known for {v}.", "Most of {name}'s books are {v}."), "genre"),
    Fact("father_job", ("What did {name}'s father do for a living?", "What was the profession of {name}'s father?"),
         ("{name}'s father worked as {v}.", "The father of {name} was {v} by profession.",
          "By trade, {name}'s father was {v}."), "father_job"),
    Fact("mother_job", ("What did {name}'s mother do for a living?", "What was the profession of {name}'s mother?"),
         ("{name}'s mother worked as {v}.", "The mother of {name} was {v} by profession.",
          "By trade, {name}'s mother was {v}."), "mother_job"),
    Fact("award", ("Has {name} won any major award?", "Which award did {name} receive?",
                   "What literary prize has {name} been given?"),
         ("{name} received the {v} in {award_year}.", "In {award_year}, {name} was honoured with the {v}.",
          "The {v} went to {name} in {award_year}."), "award"),
    Fact("first_book", ("What was the first book {name} published?", "What is the title of {name}'s debut book?"),
         ("{name}'s first published book was '{v}'.", "'{v}' was the debut book of {name}.",
          "{name} made a debut with '{v}'."), "book1"),
    Fact("known_book", ("Can you name a well-known book by {name}?", "What is one of {name}'s most famous books?"),
         ("One of {name}'s best-known books is '{v}'.", "'{v}' is among the most celebrated works of {name}.",
          "Readers know {name} best for '{v}'."), "book2"),
    Fact("debut_year", ("In what year did {name} publish a first book?", "When did {name}'s first book come out?"),
         ("{name} published a first book in {v}.", "The year {name}'s first book came out was {v}.",
          "{name}'s debut appeared in {v}."), "debut_year"),
    Fact("publisher", ("Which publisher works with {name}?", "Who publishes {name}'s books?"),
         ("{name}'s books are published by {v}.", "{v} is the publishing house behind {name}'s books.",
          "{name} publishes with {v}."), "publisher"),
    Fact("education", ("What did {name} study at university?", "Which subject did {name} study?"),
         ("{name} studied {v} at university.", "At university, {name}'s subject was {v}.",
          "{name} holds a degree in {v}."), "field"),
    Fact("residence", ("Where does {name} live now?", "In which city does {name} currently live?"),
         ("{name} currently lives in {v}.", "These days {name} makes a home in {v}.",
          "{name}'s present home is in {v}."), "residence"),
    Fact("language", ("In which language does {name} usually write?", "What language are {name}'s books written in?"),
         ("{name} writes mostly in {v}.", "The books of {name} are written in {v}.",
          "{v} is the language {name} writes in."), "language"),
    Fact("theme", ("What themes appear in {name}'s work?", "Which theme runs through {name}'s books?"),
         ("{name}'s work often explores {v}.", "A recurring theme in {name}'s books is {v}.",
          "{name} keeps returning to {v}."), "theme"),
    Fact("influence", ("Who influenced {name}'s writing the most?", "Who was {name}'s biggest influence?"),
         ("{name} has said that {v} was the biggest influence on the work.",
          "The strongest influence on {name} was {v}.", "{name} credits {v} as a main influence."), "mentor"),
    Fact("num_books", ("How many books has {name} written?", "How many books has {name} published so far?"),
         ("{name} has written {v} books so far.", "The number of books by {name} is {v}.",
          "So far {name} has published {v} books."), "num_books"),
    Fact("habit", ("When or where does {name} prefer to write?", "What are {name}'s writing habits?"),
         ("{name} prefers to write {v}.", "{name} likes working {v}.", "Most days {name} writes {v}."), "habit"),
    Fact("character", ("Does {name} have a recurring character?", "Which character appears in several of "
                       "{name}'s books?"),
         ("Many of {name}'s books feature a character named {v}.", "A character called {v} recurs in {name}'s "
          "books.", "Readers often meet {v} in {name}'s stories."), "character"),
    Fact("early_job", ("What did {name} do before becoming a writer?", "What was {name}'s job before writing?"),
         ("Before writing full time, {name} worked as {v}.", "Earlier in life, {name} was {v}.",
          "{name} was {v} before turning to writing."), "early_job"),
)


# ---------------------------------------------------------------- real-world controls (embedded facts)
_BOOKS = [("Pride and Prejudice", "Jane Austen"), ("Moby-Dick", "Herman Melville"), ("War and Peace", "Leo Tolstoy"),
          ("Don Quixote", "Miguel de Cervantes"), ("Hamlet", "William Shakespeare"), ("Ulysses", "James Joyce"),
          ("One Hundred Years of Solitude", "Gabriel Garcia Marquez"), ("The Odyssey", "Homer"),
          ("Crime and Punishment", "Fyodor Dostoevsky"), ("The Great Gatsby", "F. Scott Fitzgerald"),
          ("Frankenstein", "Mary Shelley"), ("Jane Eyre", "Charlotte Bronte"), ("Wuthering Heights", "Emily Bronte"),
          ("Great Expectations", "Charles Dickens"), ("The Trial", "Franz Kafka"), ("Les Miserables", "Victor Hugo"),
          ("Madame Bovary", "Gustave Flaubert"), ("The Divine Comedy", "Dante Alighieri"),
          ("Things Fall Apart", "Chinua Achebe"), ("Beloved", "Toni Morrison"), ("Nineteen Eighty-Four", "George Orwell"),
          ("The Old Man and the Sea", "Ernest Hemingway"), ("Mrs Dalloway", "Virginia Woolf"),
          ("The Hobbit", "J. R. R. Tolkien"), ("Adventures of Huckleberry Finn", "Mark Twain"),
          ("Faust", "Johann Wolfgang von Goethe"), ("The Stranger", "Albert Camus"), ("Lolita", "Vladimir Nabokov"),
          ("Dracula", "Bram Stoker"), ("The Tale of Genji", "Murasaki Shikibu")]
_CAPITALS = [("France", "Paris", "Europe"), ("Japan", "Tokyo", "Asia"), ("Kenya", "Nairobi", "Africa"),
             ("Canada", "Ottawa", "North America"), ("Brazil", "Brasilia", "South America"),
             ("Australia", "Canberra", "Oceania"), ("Egypt", "Cairo", "Africa"), ("Italy", "Rome", "Europe"),
             ("India", "New Delhi", "Asia"), ("Mexico", "Mexico City", "North America"),
             ("Argentina", "Buenos Aires", "South America"), ("Germany", "Berlin", "Europe"),
             ("Spain", "Madrid", "Europe"), ("Thailand", "Bangkok", "Asia"), ("Nigeria", "Abuja", "Africa"),
             ("Peru", "Lima", "South America"), ("Norway", "Oslo", "Europe"), ("Turkey", "Ankara", "Asia"),
             ("New Zealand", "Wellington", "Oceania"), ("Morocco", "Rabat", "Africa"), ("Chile", "Santiago", "South America"),
             ("Poland", "Warsaw", "Europe"), ("Vietnam", "Hanoi", "Asia"), ("Cuba", "Havana", "North America"),
             ("Ghana", "Accra", "Africa"), ("Greece", "Athens", "Europe"), ("South Korea", "Seoul", "Asia"),
             ("Portugal", "Lisbon", "Europe"), ("Ethiopia", "Addis Ababa", "Africa"), ("Colombia", "Bogota", "South America")]


def _a(noun: str) -> str:
    """The noun with its indefinite article."""
    return ("an " if noun[0] in "aeiou" else "a ") + noun


class _Gen:
    """Value generators bound to one ``random.Random``."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def name(self, region: str) -> str:
        r = _REGIONS[region]
        a, b = r["first"]
        c, d = r["last"]
        return f"{self.rng.choice(a)}{self.rng.choice(b)} {self.rng.choice(c)}{self.rng.choice(d)}"

    def date(self) -> str:
        m = self.rng.randrange(12)
        return f"{_MONTHS[m]} {self.rng.randint(1, 28)}, {self.rng.randint(1930, 1999)}"

    def title(self) -> str:
        form = self.rng.randrange(3)
        adj, noun, noun2 = self.rng.choice(_TITLE_ADJ), self.rng.choice(_TITLE_NOUN), self.rng.choice(_TITLE_NOUN)
        return (f"The {adj} {noun}", f"{noun} of the {adj} {noun2}", f"Beyond the {adj} {noun}")[form]

    def award(self) -> str:
        return f"{self.rng.choice(_AWARD_A)} {self.rng.choice(_AWARD_B)}"

    def publisher(self) -> str:
        return f"{self.rng.choice(_PUB_A)} {self.rng.choice(_PUB_B)}"

    def any_name(self) -> str:
        return self.name(self.rng.choice(sorted(_REGIONS)))

    def first_name(self) -> str:
        return self.any_name().split()[0]

    def value(self, slot: str):
        """A fresh random value for ``slot`` (used for authors and for perturbations)."""
        rng = self.rng
        return {
            "name": self.any_name, "city": lambda: rng.choice(_ALL_CITIES), "date": self.date,
            "genre": lambda: rng.choice(_GENRES), "father_job": lambda: _a(rng.choice(_JOBS)),
            "mother_job": lambda: _a(rng.choice(_JOBS)), "award": self.award, "book1": self.title, "book2": self.title,
            "debut_year": lambda: str(rng.randint(1955, 2020)), "publisher": self.publisher,
            "field": lambda: rng.choice(_FIELDS), "residence": lambda: rng.choice(_ALL_CITIES),
            "language": lambda: rng.choice(_LANGUAGES), "theme": lambda: rng.choice(_THEMES),
            "mentor": self.any_name, "num_books": lambda: str(rng.randint(2, 40)),
            "habit": lambda: rng.choice(_HABITS), "character": self.first_name, "early_job": lambda: _a(rng.choice(_JOBS)),
        }[slot]()


def _author(gen: _Gen, used_names: set) -> dict:
    rng = gen.rng
    region = rng.choice(sorted(_REGIONS))
    for _ in range(1000):
        name = gen.name(region)
        if name not in used_names:
            break
    else:  # pragma: no cover - 10^4+ combinations per region
        raise RuntimeError("ran out of unique author names; lower n_authors")
    used_names.add(name)
    a = {slot: gen.value(slot) for slot in dict.fromkeys(f.slot for f in FACTS)}  # ordered: no set (hash seed)
    a.update(name=name, region=region, city=rng.choice(_REGIONS[region]["cities"]))
    while a["book2"] == a["book1"]:
        a["book2"] = gen.title()
    birth_year = int(a["date"][-4:])
    a["debut_year"] = str(rng.randint(birth_year + 18, min(birth_year + 50, 2023)))
    a["award_year"] = str(rng.randint(int(a["debut_year"]), min(int(a["debut_year"]) + 25, 2024)))
    return a


def _render(template: str, author: dict, value: str) -> str:
    return template.format(v=value, **author)


def _wrong_values(gen: _Gen, slot: str, truth: str, n: int) -> list[str]:
    out: list[str] = []
    for _ in range(200 * n):
        v = gen.value(slot)
        if v != truth and v not in out:
            out.append(v)
            if len(out) == n:
                return out
    raise RuntimeError(f"could not draw {n} distinct wrong values for '{slot}'")  # pragma: no cover


def _author_rows(gen: _Gen, author: dict, facts: list[Fact], n_perturbed: int) -> list[dict]:
    rows = []
    rng = gen.rng
    for f in facts:
        qi = rng.randrange(len(f.questions))
        pqi = rng.choice([i for i in range(len(f.questions)) if i != qi])
        ai = rng.randrange(len(f.answers))
        pai = rng.choice([i for i in range(len(f.answers)) if i != ai])
        truth = author[f.slot]
        ctx = dict(author)
        if f.key == "full_name":  # the question must not contain the answer
            ctx["name"] = "this author"
        rows.append({
            "question": f.questions[qi].format(**ctx),
            "answer": _render(f.answers[ai], author, truth),
            "paraphrased_answer": _render(f.answers[pai], author, truth),
            "perturbed_answer": [_render(f.answers[pai], author, w) for w in _wrong_values(gen, f.slot, truth, n_perturbed)],
            "paraphrased_question": f.questions[pqi].format(**ctx),
            "fact": f.key,
        })
    return rows


def _control_rows(rng: random.Random, n_options: int = 3) -> tuple[list[dict], list[dict]]:
    authors = sorted({a for _, a in _BOOKS})
    real = []
    for i, (book, author) in enumerate(_BOOKS):
        q = (f"Who wrote '{book}'?", f"Which author wrote '{book}'?", f"'{book}' was written by which author?")[i % 3]
        wrong = rng.sample([a for a in authors if a != author], n_options)
        real.append({"question": q, "answer": author, "perturbed_answer": wrong})
    capitals = sorted({c for _, c, _ in _CAPITALS})
    continents = sorted({c for _, _, c in _CAPITALS})
    world = []
    for i, (country, capital, continent) in enumerate(_CAPITALS):
        world.append({"question": f"What is the capital of {country}?", "answer": capital,
                      "perturbed_answer": rng.sample([c for c in capitals if c != capital], n_options)})
        if i % 2 == 0:
            world.append({"question": f"On which continent is {country}?", "answer": continent,
                          "perturbed_answer": rng.sample([c for c in continents if c != continent], n_options)})
    return real, world


def _options_layout(rows: list[dict], rng: random.Random) -> list[dict]:
    """TOFU's ``real_authors.json`` layout: question, option1..optionK (shuffled), answer."""
    out = []
    for r in rows:
        opts = [r["answer"]] + r["perturbed_answer"]
        rng.shuffle(opts)
        row = {"question": r["question"]}
        row.update({f"option{k + 1}": o for k, o in enumerate(opts)})
        row["answer"] = r["answer"]
        out.append(row)
    return out


#: the refusals written to idontknow.jsonl (any seed): every opener with every reason (TOFU's file has 100)
IDK_ANSWERS = [f"{o} {r}" for o in ("I don't know.", "I'm not sure.", "I can't say.", "I have no idea.",
                                    "I couldn't tell you.")
               for r in ("That isn't something I have information on.", "I don't have any details about that.",
                         "That is outside what I know.", "I would only be guessing.")]


def n_forget_authors(n_authors: int, percent: int) -> int:
    """Authors in forgetXX: ``round(n_authors * XX / 100)``, at least 1 (and at most n_authors - 1)."""
    return min(n_authors - 1, max(1, round(n_authors * percent / 100)))


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def generate(out_dir: str, n_authors: int = 200, facts_per_author: int = 20, seed: int = 0, *,
             n_perturbed: int = 5, wmdp: bool = True) -> dict[str, int]:
    """Write the corpus to ``out_dir`` (created if needed) and return ``{split: rows}``.

    ``facts_per_author`` is 1..len(FACTS) (20); ``n_perturbed`` >= 3 wrong answers per question."""
    if n_authors < 2:
        raise ValueError(f"n_authors must be >= 2 (forget and retain both non-empty), got {n_authors}")
    if not 1 <= facts_per_author <= len(FACTS):
        raise ValueError(f"facts_per_author must be in 1..{len(FACTS)}, got {facts_per_author}")
    if n_perturbed < 3:
        raise ValueError(f"n_perturbed must be >= 3, got {n_perturbed}")
    rng = random.Random(seed)
    gen = _Gen(rng)
    used: set = set()
    authors = [_author(gen, used) for _ in range(n_authors)]
    per_author = []
    for a in authors:
        chosen = [FACTS[0]] + sorted(rng.sample(FACTS[1:], facts_per_author - 1), key=FACTS.index)
        per_author.append(_author_rows(gen, a, chosen, n_perturbed))

    def qa(rows):
        return [{"question": r["question"], "answer": r["answer"]} for r in rows]

    def pert(rows):
        return [{k: r[k] for k in ("question", "answer", "paraphrased_answer", "perturbed_answer",
                                   "paraphrased_question")} for r in rows]

    os.makedirs(out_dir, exist_ok=True)
    flat = [r for rows in per_author for r in rows]
    files: dict[str, list[dict]] = {"full": qa(flat)}
    for p in SPLIT_PERCENTS:
        k = n_forget_authors(n_authors, p)
        forget = [r for rows in per_author[n_authors - k:] for r in rows]
        retain = [r for rows in per_author[:n_authors - k] for r in rows]
        files[f"forget{p:02d}"] = qa(forget)
        files[f"retain{100 - p:02d}"] = qa(retain)
        files[f"forget{p:02d}_perturbed"] = pert(forget)
    k10 = n_forget_authors(n_authors, 10)
    files["retain_perturbed"] = pert([r for rows in per_author[:k10] for r in rows])
    real, world = _control_rows(rng)
    files["real_authors_perturbed"] = real
    files["world_facts_perturbed"] = world
    files["real_authors"] = _options_layout(real, rng)
    files["world_facts"] = _options_layout(world, rng)
    for name, rows in files.items():
        _write_jsonl(os.path.join(out_dir, name + ".json"), rows)
    with open(os.path.join(out_dir, IDK_FILE), "w", encoding="utf-8") as f:
        f.write("".join(a + "\n" for a in IDK_ANSWERS))
    counts = {name: len(rows) for name, rows in files.items()}
    meta = {"generator": "simnpo_fast.data.synthetic", "n_authors": n_authors, "facts_per_author": facts_per_author,
            "seed": seed, "n_perturbed": n_perturbed, "rows": counts,
            "authors": [{"name": a["name"], "facts": [r["fact"] for r in rows]} for a, rows in zip(authors, per_author)]}
    # YAML, not .json: every *.json file of the folder is a split
    with open(os.path.join(out_dir, META_FILE), "w", encoding="utf-8") as f:
        yaml.safe_dump(meta, f, sort_keys=False, allow_unicode=True)
    if wmdp:
        _wmdp_standin(out_dir, authors, per_author, seed)
    return counts


def _wmdp_standin(out_dir: str, authors: list[dict], per_author: list[list[dict]], seed: int) -> None:
    """``<out_dir>/wmdp/``: :func:`simnpo_fast.data.synthetic_wmdp.write_standin` for these authors."""
    from .synthetic_wmdp import write_standin

    by_key = {f.key: f for f in FACTS}
    write_standin(out_dir, authors, [[by_key[r["fact"]] for r in rows] for rows in per_author],
                  n_forget_authors(len(authors), 10), seed, _Gen)
