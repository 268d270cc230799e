"""`coursesignup`: the command-line client for people (issue 13).

It talks to the four services over gRPC only, through the generated stubs, like any
other backend: no import of a service's code, no database, no stream.
"""
