"""How each kind of fact is stated, changed, asked for and answered, and the small talk around it.

Templates marked ``*`` appear only in the held-out split (see ``rxt.data.dialogues``); ``{v}`` is
the value.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fact:
    """How one kind of fact is stated, changed, asked for and answered. ``*`` marks held-out templates."""

    slot: str
    pool: str
    statements: tuple[str, ...]
    updates: tuple[str, ...]
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    acks: tuple[str, ...]


FACTS = (
    Fact("user_name", "name",
         ("My name is {v}.", "I'm {v}, by the way.", "You can call me {v}.", "Hi, I am {v}.", "*People call me {v}."),
         ("Actually, please call me {v} instead.", "Sorry, my real name is {v}."),
         ("What is my name?", "Do you remember my name?", "Who am I?", "*What did I say my name was?"),
         ("Your name is {v}.", "You are {v}.", "You told me your name is {v}."),
         ("Nice to meet you, {v}!", "Hello {v}, good to meet you.", "Nice to meet you too.")),
    Fact("pet_name", "name",
         ("My dog is called {v}.", "I have a cat named {v}.", "My pet's name is {v}.", "*Our puppy is {v}."),
         ("Actually, we renamed our pet to {v}.", "I got a new pet, it is called {v}."),
         ("What is my pet called?", "What's my pet's name?", "Do you remember my pet's name?",
          "*What did I name my pet?"),
         ("Your pet is called {v}.", "Your pet's name is {v}.", "It is called {v}."),
         ("{v} is a lovely name for a pet.", "Aww, {v} sounds sweet.", "Pets are great company.")),
    Fact("city", "city",
         ("I live in {v}.", "I'm from {v}.", "My home is in {v}.", "*My town is {v}."),
         ("Actually, I moved to {v}.", "We just moved to {v}."),
         ("Where do I live?", "Which city do I live in?", "Where is my home?", "*What city did I say I live in?"),
         ("You live in {v}.", "Your home is in {v}.", "You are from {v}."),
         ("{v} is a nice place.", "I have heard good things about {v}.", "That sounds like a nice city.")),
    Fact("colour", "colour",
         ("My favourite colour is {v}.", "I love the colour {v}.", "I like {v} more than any other colour.",
          "*The best colour is {v}, I think."),
         ("Actually, my favourite colour is {v} now.", "I changed my mind, I like {v} best."),
         ("What is my favourite colour?", "Which colour do I like best?", "*Do you know my favourite colour?"),
         ("Your favourite colour is {v}.", "You like {v} best.", "It is {v}."),
         ("{v} is a great colour.", "Good choice, {v} is nice.", "Nice choice.")),
    Fact("food", "food",
         ("My favourite food is {v}.", "I could eat {v} every day.", "I really love {v}.",
          "*Nothing beats {v} for dinner."),
         ("Actually, these days I prefer {v}.", "My new favourite food is {v}."),
         ("What is my favourite food?", "What food do I love?", "*Which food did I say I like most?"),
         ("Your favourite food is {v}.", "You love {v}.", "It is {v}."),
         ("Yum, {v} is tasty.", "{v} sounds delicious.", "Good taste!")),
    Fact("age", "age",
         ("I am {v} years old.", "My age is {v}.", "I turned {v} this year.", "*I'm {v} now."),
         ("Actually, I just turned {v}.", "Sorry, I am really {v} years old."),
         ("How old am I?", "What is my age?", "*Do you remember how old I am?"),
         ("You are {v} years old.", "Your age is {v}.", "You are {v}."),
         ("{v} is a good age.", "Thanks for telling me.", "Nice, {v} years!")),
    Fact("job", "job",
         ("I work as a {v}.", "I am a {v} by trade.", "My job? I'm a {v}.", "*I earn my living as a {v}."),
         ("Actually, I am a {v} now.", "I changed jobs, I work as a {v} now."),
         ("What do I do for a living?", "What is my job?", "*What did I say my job was?"),
         ("You work as a {v}.", "You are a {v}.", "Your job is {v}."),
         ("Being a {v} sounds interesting.", "A {v}, how nice.", "That sounds like hard work.")),
    Fact("sister_name", "name",
         ("My sister is called {v}.", "I have a sister named {v}.", "My sister's name is {v}.",
          "*{v} is my little sister."),
         ("Actually, my sister's name is {v}, I misspoke.", "Sorry, my sister is called {v}."),
         ("What is my sister's name?", "What's my sister called?", "*Who is my sister?"),
         ("Your sister is called {v}.", "Your sister's name is {v}.", "Her name is {v}."),
         ("Say hi to {v} from me.", "{v} is a nice name.", "Family is important.")),
    Fact("friend_name", "name",
         ("My best friend is {v}.", "My best friend is called {v}.", "I hang out with my friend {v} a lot.",
          "*{v} has been my best friend for years."),
         ("Actually, my best friend now is {v}.", "These days my best friend is {v}."),
         ("Who is my best friend?", "What is my best friend's name?", "*Do you recall my best friend's name?"),
         ("Your best friend is {v}.", "Your best friend is called {v}.", "It is {v}."),
         ("{v} sounds like a good friend.", "Good friends are rare.", "Nice, say hi to {v}.")),
    Fact("sport", "sport",
         ("My favourite sport is {v}.", "I play {v} every weekend.", "I love watching {v}.",
          "*I am really into {v}."),
         ("Actually, I prefer {v} now.", "These days my favourite sport is {v}."),
         ("What is my favourite sport?", "Which sport do I like?", "*What sport did I say I love?"),
         ("Your favourite sport is {v}.", "You like {v}.", "It is {v}."),
         ("{v} is fun.", "{v} keeps you fit.", "Sports are fun.")),
)
FACTS_BY_SLOT = {fact.slot: fact for fact in FACTS}

# More ways to state each fact, for training only (``paraphrases=p``: a share p of the statements is
# drawn from these). They widen the phrasings a model learns to read a fact from, value-first ones
# included where the value is capitalised or a number; none is a held-out template, nor uses the words
# that make those new ("town", "puppy", "dinner", "really into", "little", "for years").
PARAPHRASES = {
    "user_name": ("{v} is my name.", "{v} here.", "The name's {v}.", "I go by {v}.", "Everyone knows me as {v}.",
                  "My first name is {v}.", "Hello, {v} speaking.", "Please call me {v}."),
    "pet_name": ("{v} is my dog.", "{v} is the name of my cat.", "We have a pet called {v}.", "Our cat is {v}.",
                 "My rabbit's name is {v}.", "I own a parrot called {v}.", "My kitten is named {v}.",
                 "I walk my dog {v} every morning."),
    "city": ("{v} is where I live.", "{v} is my home.", "My home city is {v}.", "I am based in {v}.",
             "These days I call {v} home.", "My address is in {v}.", "I grew up in {v} and still live there.",
             "I have lived in {v} all my life."),
    "colour": ("I always pick {v}.", "My favourite shade is {v}.", "Everything I own is {v}.",
               "If I had to choose one colour, it would be {v}.", "I paint everything {v}.",
               "My favourite colour? Definitely {v}.", "I wear {v} all the time."),
    "food": ("I eat {v} whenever I can.", "My favourite meal is {v}.", "I never get tired of {v}.",
             "I would eat {v} for every meal.", "My favourite dish is {v}.", "I am a huge fan of {v}.",
             "Give me {v} any day."),
    "age": ("{v} is my age.", "I'm {v} years old.", "I was born {v} years ago.", "I have been alive for {v} years.",
            "My age? {v}.", "Last birthday I turned {v}."),
    "job": ("I'm a {v}.", "My job is {v}.", "By profession I am a {v}.", "My work? I'm a {v}.",
            "I have worked as a {v} for a while.", "My profession is {v}.", "For work I am a {v}."),
    "sister_name": ("{v} is my sister.", "{v} is my sister's name.", "I have a sister, her name is {v}.",
                    "My only sister is {v}.", "My sister {v} lives nearby.", "My sister goes by {v}."),
    "friend_name": ("{v} is my best friend.", "My closest friend is {v}.", "My best mate is {v}.",
                    "{v} is the friend I trust most.", "I spend weekends with my best friend, {v}.",
                    "My best friend's name is {v}."),
    "sport": ("I'm a big fan of {v}.", "I do {v} in my free time.", "I enjoy playing {v}.", "My sport is {v}.",
              "Every Sunday I play {v}.", "I never miss a game of {v}.", "My favourite game is {v}."),
}

# Small talk: (query, possible answers). Queries marked * appear only in the held-out split.
SMALL_TALK = (
    ("How are you today?", ("I am fine, thank you.", "Very well, thanks for asking.")),
    ("What is the weather like?", ("It looks sunny today.", "I think it will rain later.")),
    ("Can you tell me a joke?", ("Why did the chicken cross the road? To get to the other side.",)),
    ("What time is it?", ("I do not have a clock, sorry.", "I am not sure what time it is.")),
    ("Do you like music?", ("Yes, I enjoy music a lot.", "I like most kinds of music.")),
    ("What should I cook tonight?", ("How about something simple, like soup?", "Maybe try a new recipe.")),
    ("I am tired.", ("You should get some rest.", "Maybe take a short break.")),
    ("I had a long day at work.", ("That sounds exhausting.", "I hope you can relax now.")),
    ("Do you read books?", ("I like stories of all kinds.", "Yes, books are wonderful.")),
    ("Any plans for the weekend?", ("I will be here to chat.", "Maybe you could go for a walk.")),
    ("Tell me something interesting.", ("Octopuses have three hearts.", "Honey never spoils.")),
    ("What is your name?", ("I am your chat assistant.", "I am a small reactive model.")),
    ("Thanks for listening.", ("You are welcome.", "Any time.")),
    ("I went for a walk today.", ("Walking is good for you.", "That sounds nice.")),
    ("What do you think about movies?", ("Movies are a great way to relax.", "I like a good comedy.")),
    ("It is cold outside.", ("Stay warm and wear a coat.", "A hot drink would help.")),
    ("I am learning to paint.", ("That is a lovely hobby.", "Keep practising, it gets easier.")),
    ("Do you like the sea?", ("The sea is beautiful.", "Yes, the sound of waves is calming.")),
    ("What is two plus two?", ("Two plus two is four.",)),
    ("I watched a film last night.", ("Was it any good?", "I hope you enjoyed it.")),
    ("Can you help me relax?", ("Take a deep breath and count to ten.", "Try to rest for a moment.")),
    ("I like rainy days.", ("Rainy days are cosy.", "Rain can be very calming.")),
    ("Do you sleep?", ("No, I do not need sleep.", "I never sleep.")),
    ("I baked some bread today.", ("Fresh bread is the best.", "That sounds delicious.")),
    ("What is your favourite season?", ("I like spring the most.", "Autumn is lovely.")),
    ("*How is your day going?", ("It is going well, thanks.", "Pretty good so far.")),
    ("*I just got back from the gym.", ("Well done, exercise is good.", "You must feel great.")),
    ("*Do you like coffee or tea?", ("Both are nice.", "I think tea is relaxing.")),
    ("*I feel a bit bored.", ("Maybe try a new hobby.", "How about a short walk?")),
)
