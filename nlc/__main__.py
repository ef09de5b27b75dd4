from nlc.cli import app

app()
