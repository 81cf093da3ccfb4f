"""A small paraphrase retrieval set for the dense-encoder and integration tests:
facts and questions that share no content word (checked by content_words()),
plus distractor notes. Hand-written; not a tuning set (nothing was tuned on it).
"""
import re

PAIRS = [
    ("My doctor told me to avoid peanuts because I am severely allergic to them.",
     "Which food could trigger a dangerous reaction for me?"),
    ("The team meeting was moved to Thursday afternoon at three.",
     "When is the staff gathering rescheduled for?"),
    ("Our flight to Lisbon departs from gate 22 at 6:40 in the morning.",
     "What time does the plane to Portugal's capital leave?"),
    ("The car needs its oil changed every five thousand miles.",
     "How often should the vehicle's engine lubricant be replaced?"),
    ("I am learning to play the violin and practice every evening after dinner.",
     "Which musical instrument have I been studying?"),
    ("The wifi password for the office network is written on the whiteboard in the kitchen.",
     "Where can I see the code to get online at work?"),
    ("The quarterly tax payment is due on the fifteenth of April.",
     "When is the deadline for sending money to the IRS?"),
    ("My blood pressure medication should be taken with breakfast each day.",
     "When do I swallow the pills for hypertension?"),
    ("The landlord promised to repair the leaking bathroom faucet next week.",
     "Who said they would fix the dripping tap in the washroom?"),
    ("The children's school closes early on Fridays at noon.",
     "What hour do the kids get out of class at the end of the week?"),
    ("The car is parked on level four of the airport garage, near the elevators.",
     "On which floor did I leave my automobile at the terminal lot?"),
    ("The recipe calls for two cups of flour and a teaspoon of baking soda.",
     "How much wheat powder does the cake need?"),
]

DISTRACTORS = [
    "The hiking trail along the river is closed for repairs until the spring.",
    "Remember to water the tomato plants on the balcony twice a week.",
    "The new laptop has sixteen gigabytes of memory and a larger screen.",
    "Jazz concerts in the park start again in June.",
    "The library book about Roman history must be returned by Monday.",
    "Our neighbour's dog barks whenever the mail carrier comes by.",
    "The gym offers a discount for members who sign up for a full year.",
    "Paint the fence white before the family reunion in August.",
    "The printer on the second floor keeps jamming with thick paper.",
    "My favourite novel is a mystery set on a train across Siberia.",
    "The electricity bill was higher this winter because of the heater.",
    "Buy batteries for the smoke detector in the hallway.",
]

# Words that differ only in grammar are the same content word for this check.
_STOP = frozenset("""a about after again all am an and any are as at be been before being
below between both but by can could did do does doing down during each few for from
further had has have having he her here hers him his how i if in into is it its itself
just me more most my myself no nor not now of off on once only or other our out over own
same she should so some such than that the their them then there these they this those
through to too under until up very was we were what when where which while who whom why
will with would you your get got""".split())


def _stem(w):
    for suf in ("ingly", "ings", "ing", "edly", "ed", "ies", "es", "s", "ly", "'s"):
        if w.endswith(suf) and len(w) - len(suf) >= 3:
            return w[:-len(suf)]
    return w


def content_words(text):
    return {_stem(w) for w in re.findall(r"[a-z0-9]+", text.lower())} - _STOP - {""}
