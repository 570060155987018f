"""bbc_qa: extractive QA in SQuAD format over real BBC News passages.

No SQuAD-like data can be installed here, so the questions are made by rules
from the article text itself (no model). Each question is one sentence of the
passage turned into a question about one span of it:

  speaker  '"We are pleased," said chief executive John Smith.'  -> Who said "We are pleased"?
  who      'John Smith has resigned as chairman.'                 -> Who has resigned as chairman?
  cloze    a money amount, percentage, count, year, date, month or weekday in the
           sentence is replaced by "how much", "what percentage", "how many",
           "which year", "what date", "which month" or "which day".

The answer is the replaced span, kept only if it occurs exactly once in the
passage (so its position is unambiguous), and every span is checked against the
passage before the dataset is returned. See README.md for the limits.
"""
import re

from .bbc import articles
from .splits import stable_hash, to_dataset_dict
from .squad import FEATURES

MIN_WORDS, MAX_WORDS = 120, 300  # passage size: a few paragraphs, a few hundred words
PER_PASSAGE, PER_KIND = 4, 2  # caps, so long number-heavy passages do not dominate

MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
WEEKDAYS = "Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday"
NUMBER_WORDS = "two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|twenty"
TITLES = {"Mr", "Mrs", "Ms", "Dr", "Sir", "Lord", "Lady", "Prof"}
SAID = r"(?:said|says|added|explained|warned|insisted|argued|admitted|claimed|stressed|told [A-Z][\w-]*)"
NAME = r"[A-Z][\w'-]+(?: [A-Z][\w'-]+){1,3}"  # 2-4 capitalised words; checked by _is_person
NOT_SENTENCE_END = {"Mr", "Mrs", "Ms", "Dr", "St", "Jr", "Sr", "Inc", "Ltd", "Co", "Corp", "No", "vs",
                    "Gov", "Gen", "Prof", "Rev", "Jan", "Feb", "Aug", "Sept", "Oct", "Nov", "Dec"}

# Cloze patterns: kind -> (wh-phrase, regex). Group "a" is the answer; the text
# around it stays in the question. An answer after an article or a possessive is
# used attributively ("a $300m deal", "the 11 September attacks") and would read
# "a how much deal", so NOT_ATTRIBUTIVE skips it. Each regex starts with a cheap
# lookahead for its first character, which makes the scan 3x faster.
NOT_ATTRIBUTIVE = r"(?<!\ba )(?<!\bA )(?<!\ban )(?<!\bthe )(?<!\bThe )(?<!'s )(?<!' )"
NUMBER = r"\d(?:[\d,]*\d)?"  # 464,000 but not the comma after it
YEAR = r"(?:19|20)\d\d"
PREPOSITION = r"\b(?:in|since|until|by|from|before|after|during)"
CLOZE = {
    "money": ("how much", rf"(?=[£$€])(?<![\w.]){NOT_ATTRIBUTIVE}"
                          rf"(?P<a>[£$€]{NUMBER}(?:\.\d+)?(?: ?(?:bn|m|billion|million|trillion))?)(?![\w%.,]\d)"),
    "percent": ("what percentage", rf"(?=\d)(?<![\w.$£€-]){NOT_ATTRIBUTIVE}(?P<a>\d+(?:\.\d+)?(?:%| per ?cent\b))"),
    "date": ("what date", rf"(?=\d)(?<![\w.-]){NOT_ATTRIBUTIVE}(?P<a>\d{{1,2}} (?:{MONTHS})(?: {YEAR})?)\b"),
    "month": ("which month", rf"{PREPOSITION} (?P<a>(?:{MONTHS})(?: {YEAR})?)\b"),
    "year": ("which year", rf"(?:{PREPOSITION}|\bof) (?P<a>{YEAR})\b(?![-/%]?\w)"),
    "weekday": ("which day", rf"\bon (?P<a>{WEEKDAYS})\b"),
    "count": ("how many", rf"(?=[\dtfsenhTFSENH])(?<![\w.,$£€-]){NOT_ATTRIBUTIVE}(?!{YEAR}\b)"
                          rf"(?P<a>{NUMBER}(?: (?:million|billion))?|(?i:{NUMBER_WORDS}))(?= [a-z]{{3,}}s\b)"),
}
CLOZE = {kind: (wh, re.compile(rx)) for kind, (wh, rx) in CLOZE.items()}
SPEAKER = [  # '"...," said (descriptor) NAME' and '"...," NAME said'
    re.compile(rf'^"?(?P<q>[^"]{{12,}}?)[,.?!]" {SAID} (?:(?:[a-z][\w\'-]*|[A-Z]{{2,}}) )*?(?P<a>{NAME})[.,]'),
    re.compile(rf'^"?(?P<q>[^"]{{12,}}?)[,.?!]" (?P<a>{NAME}) {SAID}\b'),
]
# 'NAME verb ...' at sentence start; the verb is an auxiliary or ends in -s/-ed, so a
# name used as a modifier ("Howard Hughes biopic The Aviator ...") is not taken.
SUBJECT = re.compile(rf"^(?P<a>{NAME}) (?P<rest>(?:has|have|had|is|was|will|would|could|can|may|must|"
                     r"might|should|did|[a-z][\w-]*(?:ed|[^s']s)) .+)$")
OPENERS = {"But", "And", "However", "Yet", "So", "The", "In", "It", "This", "That", "He", "She", "They"}


def build():
    names = _name_lexicon()
    rows, seen = [], set()
    for art in articles():
        for p, context in enumerate(passages(art["body"])):
            if context in seen:
                continue  # two versions of a story can share a whole passage
            seen.add(context)
            for k, (question, answer, start) in enumerate(questions(context, names)):
                # The SQuAD contract, checked here so no bad span ever ships.
                assert context[start:start + len(answer)] == answer and context.count(answer) == 1, question
                rows.append({"id": f"{art['id']}/{p}/{k}", "title": art["headline"], "context": context,
                             "question": question, "answers": {"text": [answer], "answer_start": [start]},
                             "_split": art["split"], "_order": (art["order"], p, k)})
    return to_dataset_dict(rows, FEATURES)


def passages(body: str) -> list[str]:
    """Pack whole paragraphs into windows of MIN_WORDS..MAX_WORDS words (one long
    paragraph may exceed it; a short tail joins the previous window)."""
    windows, current, words = [], [], 0
    for par in body.split("\n\n"):
        n = len(par.split())
        if current and words >= MIN_WORDS and words + n > MAX_WORDS:
            windows.append(current)
            current, words = [], 0
        current.append(par)
        words += n
    if windows and words < MIN_WORDS // 2:
        windows[-1] += current
    elif current:
        windows.append(current)
    return ["\n\n".join(w) for w in windows]


def sentences(context: str):
    """Yield (start, sentence) for each sentence, splitting after . ! ? (and a closing
    quote) before a capital, digit or quote; not after Mr, Inc, initials and the like."""
    for par in re.finditer(r"[^\n]+", context):
        start = par.start()
        for m in re.finditer(r"""[.!?]["']?( +)(?=["'(£$€]?[A-Z0-9])""", par.group()):
            word = par.group()[max(0, m.start() - 12):m.start()].split()[-1:]
            if word and (word[0] in NOT_SENTENCE_END or re.fullmatch(r"[A-Z]", word[0])):
                continue
            yield start, context[start:par.start() + m.start(1)]
            start = par.start() + m.end(1)
        yield start, context[start:par.end()]


def questions(context: str, names: tuple[set, set]) -> list[tuple[str, str, int]]:
    """(question, answer, answer_start) for up to PER_PASSAGE sentences of the passage."""
    candidates = []
    for s_start, sent in sentences(context):
        if not 8 <= len(sent.split()) <= 50:
            continue
        for kind, question, answer, offset in _from_sentence(sent, names):
            if context.count(answer) == 1 and answer not in question:
                candidates.append((stable_hash(question), kind, question, answer, s_start + offset, s_start))
    # A fixed pseudo-random pick (by hash) with at most one question per sentence
    # and PER_KIND per kind, so passages get a mix of question types.
    chosen, used_sentences, kinds = [], set(), {}
    for _, kind, question, answer, start, s_start in sorted(candidates):
        if len(chosen) == PER_PASSAGE or s_start in used_sentences or kinds.get(kind, 0) == PER_KIND:
            continue
        used_sentences.add(s_start)
        kinds[kind] = kinds.get(kind, 0) + 1
        chosen.append((question, answer, start))
    return sorted(chosen, key=lambda c: c[2])


def _from_sentence(sent: str, names: tuple[set, set]):
    """Yield (kind, question, answer, answer offset in sent) for one sentence."""
    for rx in SPEAKER if '"' in sent else ():
        m = rx.match(sent)
        if m and _is_person(m["a"], names):
            quote = m["q"].split()
            quote = " ".join(quote) if len(quote) <= 25 else " ".join(quote[:20]) + " ..."
            name, offset = _trim_name(m["a"], m.start("a"))
            yield "speaker", f'Who said "{quote}"?', name, offset
    if '"' in sent:
        return  # cloze inside quotations reads badly ("We grew what percentage")
    m = SUBJECT.match(sent)
    if m and _is_person(m["a"], names) and m["a"].split()[0] not in OPENERS:
        yield "who", f"Who {_as_question(m['rest'])}", *_trim_name(m["a"], 0)
    for kind, (wh, rx) in CLOZE.items():
        for m in rx.finditer(sent):
            before, after = sent[:m.start("a")], sent[m.end("a"):]
            after = re.sub(r"^ \([^)]*\)", "", after)  # drop a conversion "(£600m)" after an amount
            phrase = wh if before else wh[0].upper() + wh[1:]
            yield kind, before + phrase + _as_question(after), m["a"], m.start("a")


def _as_question(text: str) -> str:
    """Swap the final full stop for a question mark (inside a closing quote too)."""
    return re.sub(r"""[.!]?(["']?)$""", r"\1", text.rstrip()) + "?"


def _trim_name(name: str, offset: int) -> tuple[str, int]:
    """'Chancellor Gordon Brown' -> 'Gordon Brown': without a title (Sir Alex Ferguson)
    the words before the last two are usually a job or a nationality."""
    words = name.split()
    if len(words) <= 2 or words[0] in TITLES:
        return name, offset
    short = " ".join(words[-2:])
    return short, offset + len(name) - len(short)


def _is_person(name: str, names: tuple[set, set]) -> bool:
    """A person, not a firm, a place or a capitalised first word: a title (Mr, Dr ...),
    or a last word the corpus uses after a title ("Mr Brown" makes "Gordon Brown" a
    person) and every word capitalised somewhere mid-sentence (so not "Many German")."""
    surnames, proper = names
    words = name.split()
    if any(w.endswith(("'s", "s'")) for w in words):
        return False  # "Mr Blair's office": a possessive, not the subject
    return words[0] in TITLES or (words[-1] in surnames and all(w in proper for w in words))


def _name_lexicon() -> tuple[set, set]:
    """(surnames, proper words), read off the whole corpus once."""
    text = "\n".join(a["body"] for a in articles())
    surnames = set(re.findall(r"\b(?:Mr|Mrs|Ms|Dr) ([A-Z][\w'-]+)", text))
    proper = set(re.findall(r"(?<=[a-z,] )[A-Z][\w'-]+", text))
    return surnames, proper
