"""Phrasing bank that expands the catalog's examples into many ways callers say each intent.

Placeholders: {amount} (money words), {day} (weekday/today/tomorrow), {acct} (digits one by one).
Held-out splits are made over whole templates (see synth.split_of_template), so every phrasing
below lands in exactly one of train/val/test.
"""

from __future__ import annotations

from functools import cache

PHRASES: dict[str, list[str]] = {
    "check_balance": [
        "what is my balance", "how much do I owe", "what's my account balance", "what do I owe you",
        "can you tell me my balance", "I want to check my balance", "how much is my bill this month",
        "what's the amount due on my account", "check my balance please", "what's my current balance",
        "how much money do I owe on this account", "I'd like to know my balance", "balance please",
        "what is the total on my bill", "how much is due", "tell me how much I owe",
        "can I get my account balance", "what's the balance on my account", "how much do I have to pay this month",
        "I need to know what I owe", "what's outstanding on my account", "account balance",
        "how much is left to pay", "what's my bill at right now", "do I owe anything", "what is the amount I owe", "I'd like my balance", "can you read me my balance", "is my account paid up", "what's the total due", "how much do I need to pay", "what does my account show", "am I behind on my payments", "when is my payment due and how much", "what's the current amount on my bill", "I'm calling about my balance", "my balance", "how much do I currently owe",
    ],
    "pay_bill": [
        "I want to pay my bill", "I'd like to make a payment", "pay my bill", "can I pay my bill now",
        "I want to pay {amount}", "I'd like to pay {amount} on my account", "make a payment of {amount}",
        "I need to pay my bill", "can I make a payment over the phone", "pay {amount}",
        "I want to make a payment of {amount}", "let me pay my balance", "I'd like to pay {amount} today",
        "put {amount} towards my bill", "I'm calling to pay my bill", "can I pay {amount} now",
        "I want to pay off my balance", "take a payment of {amount}", "I would like to pay what I owe",
        "how do I pay my bill", "I'll pay {amount}", "pay the full amount please", "I want to pay with my card",
        "I want to settle my account", "I'm ready to pay", "can I pay now", "I'd like to pay off my account", "I have a payment to make", "here to pay {amount}", "put a payment on my account", "I want to pay the balance in full", "charge my card for {amount}", "can you take {amount} from my card", "I need to make a payment today", "paying my bill", "I wanna pay my bill", "let me pay {amount} now",
    ],
    "report_outage": [
        "my internet is down", "there's a power outage at my house", "I have no service", "my connection keeps dropping",
        "the internet isn't working", "my power went out", "I've got no dial tone", "my phone line is dead",
        "nothing is working at my place", "is there an outage in my area", "my wifi stopped working",
        "the service has been down all morning", "I lost my internet connection", "we have no electricity",
        "my cable and internet are both out", "I want to report an outage", "the line is not working",
        "my service is out", "the internet keeps cutting out", "I can't get online", "there's no signal",
        "my lights went out", "the whole street has no power", "my internet has been down since last night", "the tv and internet are out", "my router has a red light", "there's no connection at all", "my landline isn't working", "the electricity is off", "my service went down", "I can't make any calls", "my internet is really slow and keeps going down", "is the network down", "our power is out", "the signal is gone",
    ],
    "reset_password": [
        "I need to reset my password", "I forgot my password", "I can't log into my account", "reset my password",
        "I'm locked out of my account", "my password doesn't work", "help me change my password",
        "I can't sign in", "I need a new password", "the website won't let me log in", "I forgot my login",
        "how do I reset my password", "my account is locked", "I want to change my password",
        "I can't remember my password", "my login isn't working", "password reset please", "I can't access my online account",
        "I can't get into my account", "my password expired", "I need help logging in", "it says my password is wrong", "I'm having trouble signing in", "I need to reset my login", "can you unlock my account", "I lost my password", "send me a password reset", "the app won't accept my password", "my username or password isn't working", "I keep getting locked out",
    ],
    "schedule_technician": [
        "I need a technician to come out", "can someone come fix it on {day}", "schedule a repair visit for {day}",
        "I'd like to book a technician", "send someone out {day}", "can a technician come {day}",
        "I need someone to come to my house", "book a repair appointment", "I want a technician on {day}",
        "can you send a repair person", "schedule a service visit", "I need an appointment for {day}",
        "when can a technician come out", "I'd like someone to come look at it {day}", "set up a technician visit",
        "can somebody come and fix my equipment", "I need a repair appointment on {day}", "book me a technician for {day}",
        "I want to schedule an installation", "have someone come out on {day}",
        "I need someone to fix my equipment", "can you send a technician", "I'd like an appointment {day}", "I need a repair {day}", "when is the next available technician", "have a technician come by {day}", "my modem needs to be replaced can someone come out", "I want a service appointment", "book a visit for {day}", "can I get an installer out {day}", "I need a tech to come out", "set up a time for a repair",
    ],
    "update_address": [
        "I moved and need to update my address", "change my billing address", "I want to update my address",
        "I have a new address", "I need to change my address", "update my mailing address",
        "my address has changed", "I'm moving next month", "can you change the service address",
        "I want to move my service to a new address", "please update my address on file", "I moved",
        "I need to update my contact details", "I'd like to change where my bill goes", "new address please",
        "I'm relocating and need to transfer my service", "change of address", "the address on my account is wrong",
        "I need to give you my new address", "my address is different now", "I just moved house", "change the address on my account", "update where I live", "I'm moving to a new place", "can I update my address", "my billing address needs changing", "please change my address", "I have moved to a new apartment", "update my address please", "transfer my service to my new home",
    ],
    "billing_dispute": [
        "there's a wrong charge on my bill", "I was overcharged", "I want to dispute a charge",
        "my bill is too high", "I don't recognize this charge", "why is my bill so expensive",
        "you charged me twice", "there's a mistake on my bill", "I was charged {amount} for nothing",
        "I want a refund", "this charge is wrong", "I need to question a charge on my statement",
        "I was billed for something I didn't order", "my bill went up for no reason", "I was charged {amount} extra",
        "there's an error on my invoice", "I think I've been billed incorrectly", "I want to contest a fee",
        "why was I charged a late fee",
        "I'm being charged for something I didn't use", "this bill is wrong", "I was double charged", "why did my bill go up", "there's a charge I don't understand", "I want to dispute my bill", "you overcharged me", "I see a fee I didn't agree to", "I was charged {amount} by mistake", "my bill has an extra charge", "I shouldn't have to pay this charge", "I want money back for a wrong charge",
    ],
    "cancel_service": [
        "I want to cancel my service", "close my account", "I'd like to cancel", "cancel my subscription",
        "I want to end my contract", "I'm switching providers", "please disconnect my service",
        "I don't want this service anymore", "terminate my account", "I want to stop my service",
        "how do I cancel", "cancel everything", "I want to close my account today", "shut off my service",
        "I'm leaving and want to cancel", "I'd like to discontinue my plan", "end my service please",
        "I want to cancel my account", "I'd like to close my account", "cancel my plan", "stop my subscription", "I no longer want your service", "I'm canceling", "disconnect everything", "I'm moving to another company", "please cancel my internet", "I want out of my contract", "how can I close my account", "end my subscription",
    ],
    "speak_to_agent": [
        "let me talk to a person", "agent", "representative please", "I want to speak to someone",
        "can I talk to a human", "give me an operator", "transfer me to an agent", "I need a real person",
        "put me through to customer service", "operator", "I want to talk to a representative",
        "get me a human please", "connect me to someone", "speak to an agent", "human please",
        "I'd rather talk to a live person", "is there someone I can talk to", "customer service representative",
        "I don't want to talk to a machine",
        "can I speak with someone", "let me speak to a manager", "I want a real human", "connect me to a representative", "talk to a person please", "transfer me please", "I need to speak with customer service", "can you put me through to someone", "I want to talk to somebody", "live agent", "get me someone on the line", "I'd like to speak with a representative",
    ],
    "affirm": [
        "yes", "yeah that's right", "correct", "sure", "yep", "yes please", "that's correct", "absolutely",
        "right", "yes it is", "uh huh", "exactly", "that's right", "yeah", "okay yes", "definitely", "yes that's it",
        "of course", "you got it", "sounds good",
        "yes that's correct", "yup", "mm hmm", "that is right", "yes I did", "sure thing", "correct yes", "affirmative", "yeah exactly", "please do", "go ahead", "alright yes",
    ],
    "deny": [
        "no", "nope", "that's not right", "no thanks", "no it's not", "that's wrong", "not really", "negative",
        "no that's incorrect", "nah", "no way", "I don't think so", "that's not it", "no not that",
        "incorrect", "no that's not what I said", "definitely not",
        "no that's not right", "no I didn't", "not at all", "no no", "wrong", "that's not what I want", "no thank you", "nope that's wrong", "absolutely not", "no I said something else", "not correct",
    ],
    "repeat": [
        "can you repeat that", "say that again", "what did you say", "pardon", "sorry I didn't catch that",
        "could you say that one more time", "repeat please", "come again", "I didn't hear you",
        "one more time please", "what was that", "can you go over that again", "excuse me", "say it again",
        "I missed that", "could you repeat the last part",
        "what", "sorry what", "could you repeat that", "can you say that again please", "huh", "I didn't get that", "repeat that please", "say again", "sorry can you repeat", "one more time", "what did you just say",
    ],
    "goodbye": [
        "goodbye", "that's all thanks bye", "bye", "no that's everything", "thanks bye", "that's it for today",
        "have a nice day bye", "I'm done thank you", "bye bye", "that's all I needed", "see you", "talk to you later",
        "okay thanks goodbye", "nothing else thanks", "that will be all", "thank you goodbye",
        "that's all goodbye", "okay bye", "bye now", "alright thanks bye", "no that's it thanks", "thanks that's all", "I'm all set bye", "goodbye thank you", "that's everything thanks", "thank you bye bye", "okay that's it goodbye",
    ],
    "out_of_scope": [
        "what's the weather like today", "can you order me a pizza", "who won the game last night",
        "what time is it in london", "tell me a joke", "how do I bake bread", "what's the capital of france",
        "can you book me a flight", "play some music", "I want to buy a car", "what movies are playing",
        "how tall is mount everest", "do you like dogs", "where is the nearest restaurant",
        "can you help me with my homework", "what's the score of the match", "recommend a good book",
        "how do I get to the airport", "is it going to rain", "what's your favorite color",
        "what's the weather in new york", "who is the president", "can you sing a song", "how old are you", "what's on tv tonight", "find me a hotel", "how do I cook rice", "what's the stock price of apple", "are you a robot", "tell me a story", "what day is christmas", "where can I buy shoes", "translate hello into spanish", "what's a good restaurant nearby",
    ],
}

# Answers that only carry a slot value (intent null).
SLOT_ONLY: list[str] = [
    "{acct}", "my account number is {acct}", "it's {acct}", "account number {acct}", "the number is {acct}",
    "um {acct}", "{acct} that's my account", "sure it's {acct}",
    "{amount}", "about {amount}", "{amount} please", "make it {amount}", "it's {amount}",
    "{day}", "{day} works", "how about {day}", "{day} would be good", "maybe {day}", "{day} please",
    "yeah it's {acct}", "the account is {acct}", "{acct} is my account number", "let me see {acct}",
    "uh {amount}", "just {amount}", "{amount} is fine", "let's say {amount}",
    "{day} is fine", "I can do {day}", "let's do {day}", "{day} if possible", "uh {day}",
]

PREFIXES = ["", "", "", "", "um ", "uh ", "hi ", "hello ", "yeah ", "so ", "okay ", "hi there ", "well ", "uh yeah "]
SUFFIXES = ["", "", "", "", " please", " thanks", " thank you", " right now", " if you can"]
FRUSTRATED_PREFIXES = [
    "this is ridiculous ", "I've called three times already ", "this is the third time I'm calling ",
    "I'm really fed up ", "seriously ", "come on ", "I'm so frustrated ", "this is unacceptable ",
]
FRUSTRATED_SUFFIXES = [
    " this is ridiculous", " I'm sick of this", " this is unacceptable", " what is going on", " unbelievable",
]
DAY_WORDS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "today", "tomorrow"]

# Compositional phrasings: carrier x core. Every combination is its own template (and so lands in
# exactly one split), which gives each intent many phrasings whose content words recur across splits.
WANT = ["I want to", "I need to", "I'd like to", "can I", "could you help me", "I'm calling to", "help me",
        "I was hoping to", "can you", "please", "I'm trying to", "I would like to", "I have to", "is it possible to",
        "hey I need to", "I'm looking to", "yes I'd like to", "I just want to"]
COMPOSE: dict[str, tuple[list[str], list[str]]] = {
    "check_balance": (WANT + ["how do I"], ["check my balance", "know my balance", "find out what I owe", "get my account balance",
                                            "hear my balance", "see how much I owe", "check what's due on my account",
                                            "find out my balance", "check how much is due"]),
    "pay_bill": (WANT, ["pay my bill", "make a payment", "pay {amount}", "pay my balance", "pay {amount} on my bill",
                        "make a payment of {amount}", "pay the bill", "settle my bill",
                        "pay off my account", "pay {amount} today"]),
    "report_outage": (["I want to report that", "I'm calling because", "hi", "help", "it looks like", "I think", "um", "so",
                       "I just noticed", "right now"],
                      ["my internet is down", "the power is out", "my service is not working", "my phone line is dead",
                       "there's an outage", "my connection keeps dropping", "the wifi stopped working"]),
    "reset_password": (WANT, ["reset my password", "change my password", "get a new password", "unlock my account",
                              "recover my password", "fix my login", "log into my account", "sign in to my account"]),
    "schedule_technician": (WANT, ["schedule a technician", "book a repair visit", "get a technician out {day}",
                                   "have someone come fix it", "book a technician for {day}", "set up a repair appointment",
                                   "schedule a service visit on {day}"]),
    "update_address": (WANT, ["update my address", "change my address", "change my billing address", "update my mailing address",
                              "give you my new address", "move my service to a new address", "update the address on my account"]),
    "billing_dispute": (WANT + ["I'm calling to complain because"], ["dispute a charge", "question a charge on my bill",
                        "report a wrong charge", "get a refund for an overcharge", "fix a mistake on my bill",
                        "contest a fee on my statement"]),
    "cancel_service": (WANT, ["cancel my service", "close my account", "cancel my subscription", "end my contract",
                              "disconnect my service", "stop my service", "cancel my internet", "shut off my account"]),
    "out_of_scope": (["can you tell me", "I want to know", "do you know", "tell me", "what about"],
                     ["the weather tomorrow", "a good joke", "today's news", "the time in tokyo", "the football score",
                      "a recipe for pasta", "the best pizza place", "how to fix my car"]),
    "speak_to_agent": (WANT, ["speak to an agent", "talk to a person", "talk to a representative", "speak to a human",
                              "get an operator", "speak to someone real", "talk to customer service", "speak with a manager"]),
}


def composed(intent: str) -> list[str]:
    carriers, cores = COMPOSE.get(intent, ([], []))
    return [f"{c} {k}" for c in carriers for k in cores]


@cache
def composed_set(intent: str) -> frozenset[str]:
    """The intent's carrier x core phrasings, for membership tests (synthesis draws, eval breakdowns)."""
    return frozenset(composed(intent))

# Train-only phrasings (`bot engine synth --extra-phrasings`): more ways of saying each intent, mostly
# indirect and colloquial wording. They never enter val/test, so held-out figures stay comparable with
# models trained without them; the synthesis drops any that collide with a held-out template.
TRAIN_EXTRA: dict[str, list[str]] = {
    "check_balance": [
        "what am I looking at on my bill", "give me the damage on my account", "where does my account stand",
        "could you look up what I owe", "I got a bill and want to know the total", "what number am I at on my account",
        "has my last payment brought the balance down", "is there money owing on my account", "read out my balance for me",
        "I just want the amount I owe nothing else", "what's showing as due", "I'd like to hear the figure on my account",
        "tell me what the bill comes to", "what's the remaining amount", "how far behind am I",
    ],
    "pay_bill": [
        "I'd like to get my bill paid", "I'm trying to send you money for my bill", "can we take care of the payment now",
        "I'd like to put some money on the account", "let's get this bill paid off", "I want to clear what I owe",
        "run my card for {amount}", "I can pay {amount} right now", "I'm ready to give you {amount}",
        "I'd like to cover {amount} of the bill", "process a payment for me", "take my payment please",
        "I'm looking to pay {amount}", "go ahead and charge {amount}", "I have the money to pay my bill now",
    ],
    "report_outage": [
        "everything went dark in my house", "the modem lights are all off", "I've had no internet for hours",
        "my neighbours and I lost power", "the phone just gives me silence", "nothing loads on my computer",
        "service stopped about an hour ago", "the network has been out since this morning", "we have no power at all here",
        "streaming stopped and the internet is dead", "I keep losing my connection every few minutes", "my line went quiet",
        "the connection is completely gone", "no bars and no internet", "my electricity cut out",
    ],
    "reset_password": [
        "the site keeps rejecting my password", "I need to get back into my online account", "my password stopped working",
        "I typed my password wrong too many times", "can you help me get a new login", "I'm stuck at the sign in page",
        "I'd like a password reset link", "I can't remember how to log in", "the app says invalid password",
        "help me recover my account", "I need my login reset", "my account got locked after too many tries",
        "I can't get past the login screen", "please reset my login details", "I need to set a new password",
    ],
    "schedule_technician": [
        "I'd like someone to check my equipment {day}", "can I get a repair person out {day}", "book a home visit for me",
        "I need a service call", "please arrange for a technician", "I'd like a visit from a repair tech",
        "get a tech to my house {day}", "can your engineer come round {day}", "I need my box looked at in person",
        "I want someone to install the new router", "send a technician over please", "I'd like to set up a home visit {day}",
        "I need an engineer to come out", "arrange a repair for {day}", "can I book someone to come fix this",
    ],
    "update_address": [
        "I've moved house", "I have a new home address", "my address has changed", "I need to give you my new address",
        "please change the address on file", "we relocated last month", "I'm moving next week and need to update my details",
        "send my bills to my new place", "my mailing address is different now", "update where I live please",
        "I need to fix the address on my account", "I moved to a new apartment", "change my billing address",
        "my street address is wrong on the account", "I need my address corrected",
    ],
    "billing_dispute": [
        "there's a charge on my bill I don't recognize", "my bill is way higher than it should be", "I was charged twice",
        "I think you overcharged me", "this bill doesn't look right", "I want to contest a charge",
        "why am I being billed for something I didn't order", "there's a mistake on my invoice", "I'm disputing this month's bill",
        "you billed me for a service I cancelled", "I shouldn't have been charged this fee", "my statement has a wrong charge",
        "I want a refund for an incorrect charge", "the amount on my bill is wrong", "I'd like to question a charge",
    ],
    "cancel_service": [
        "I want to end my contract", "I'd like to stop my service", "please close my account", "I'm switching to another provider",
        "I don't want your service anymore", "I want to terminate my plan", "shut off my service at the end of the month",
        "I'm done with this service", "how do I get out of my contract", "I want to discontinue my account",
        "I'd like to close everything down", "cancel everything on my account", "I'm leaving for a different company",
        "end my subscription", "I no longer need the service",
    ],
    "speak_to_agent": [
        "I'd rather talk to someone real", "get me a human being", "put me through to a person", "I need to speak with an operator",
        "connect me with customer service", "can I talk to somebody please", "let me speak to a live agent",
        "I want a real person", "transfer me to someone", "is there a person I can talk to", "I need a human",
        "stop the robot and get me a person", "representative please", "operator", "I'd like to speak with a representative",
    ],
    "affirm": [
        "yes that's it", "that's correct", "yep", "absolutely", "sure is", "that's what I said", "uh huh", "right",
        "yes exactly", "that's the one", "correct yes", "definitely", "you got it", "yes please do", "that's it",
    ],
    "deny": [
        "no that's wrong", "nope", "not at all", "that's not it", "no I didn't say that", "negative", "wrong",
        "no that's not what I want", "incorrect", "not right", "no no", "that's not correct", "nah", "no way",
        "no thank you",
    ],
    "repeat": [
        "say that again", "I didn't catch that", "can you repeat that", "sorry what was that", "come again",
        "could you say it one more time", "I missed what you said", "pardon", "what did you say",
        "repeat that please", "one more time please", "can you go over that again", "sorry I didn't hear you",
        "could you repeat the last part", "huh",
    ],
    "goodbye": [
        "that's all I needed bye", "thanks that's everything", "okay bye now", "have a good day goodbye", "bye bye",
        "I'm all set thanks", "nothing else thank you bye", "talk to you later", "that will be all", "see you",
        "thanks for your help goodbye", "okay that's it bye", "I'm done thanks", "cheers bye", "take care bye",
    ],
    "out_of_scope": [
        "what time does the game start", "can you book me a flight", "tell me a joke", "what's the capital of france",
        "I want to order a pizza", "how's the weather this weekend", "play some music", "who is the president",
        "what's a good recipe for dinner", "can you recommend a movie", "how tall is mount everest",
        "set an alarm for seven", "where is the nearest gas station", "what's two plus two", "do you like dogs",
    ],
}
SLOT_ONLY_TRAIN_EXTRA: list[str] = [
    "it is {acct}", "that would be {acct}", "{acct} is the number", "okay {acct}", "my number is {acct}",
    "put down {amount}", "{amount} should do it", "around {amount}", "I think {amount}",
    "{day} I guess", "{day} is good for me", "any time {day}", "could we do {day}", "{day} works for me",
]
