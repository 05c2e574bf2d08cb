/*
 * TEST FIXTURE, NOT PRODUCT CODE: a deliberately broken NBD transmission server in C
 * (simple replies; READ, WRITE and FLUSH on a 1 MiB buffer), built by
 * tests/fuzz/test_sanitized.py with clang -fsanitize=address,undefined,fuzzer-no-link to
 * show that a C server plugged into the fuzz harness runs under ASan and UBSan:
 * a WRITE of exactly 0x1337 bytes overflows a heap buffer, a READ with flags 7 overflows
 * a signed int.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define DISK (1 << 20)

static unsigned char disk[DISK];

static int read_full(int fd, void *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, (char *)buf + got, n - got);
        if (r <= 0) return 0;
        got += (size_t)r;
    }
    return 1;
}

static int write_full(int fd, const void *buf, size_t n) {
    size_t put = 0;
    while (put < n) {
        ssize_t r = write(fd, (const char *)buf + put, n - put);
        if (r <= 0) return 0;
        put += (size_t)r;
    }
    return 1;
}

static uint64_t be(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = v << 8 | p[i];
    return v;
}

static void serve_fd(int fd) {
    unsigned char head[28], reply[16];
    char *scratch = malloc(4096);
    for (;;) {
        if (!read_full(fd, head, sizeof head)) break;
        uint64_t flags = be(head + 4, 2), type = be(head + 6, 2), offset = be(head + 16, 8);
        uint64_t length = be(head + 24, 4);
        uint32_t error = 0;
        if (be(head, 4) != 0x25609513 || type == 2) break;
        int in_range = offset <= DISK && length <= DISK - offset;
        if (type == 1) {
            if (length == 0x1337) {
                if (!read_full(fd, scratch, length)) break; /* the heap overflow */
            } else if (in_range) {
                if (!read_full(fd, disk + offset, length)) break;
            } else {
                for (uint64_t left = length; left; left -= left < 4096 ? left : 4096)
                    if (!read_full(fd, scratch, left < 4096 ? left : 4096)) goto out;
                error = 22;
            }
        } else if (type == 0) {
            int x = INT_MAX - 6;
            x += (int)flags; /* the signed overflow (flags 7) */
            error = in_range && x ? 0 : 22;
        } else if (type != 3) {
            error = 22;
        }
        memcpy(reply, "\x67\x44\x66\x98", 4);
        for (int i = 0; i < 4; i++) reply[4 + i] = (unsigned char)(error >> (24 - 8 * i));
        memcpy(reply + 8, head + 8, 8);
        if (!write_full(fd, reply, sizeof reply)) break;
        if (type == 0 && !error && !write_full(fd, disk + offset, length)) break;
    }
out:
    free(scratch);
    close(fd);
}

static PyObject *serve(PyObject *self, PyObject *args) {
    int fd;
    (void)self;
    if (!PyArg_ParseTuple(args, "i", &fd)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    serve_fd(fd);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {{"serve", serve, METH_VARARGS, "serve fd until EOF"}, {0}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_toyserve", NULL, -1, methods};
PyMODINIT_FUNC PyInit__toyserve(void) { return PyModule_Create(&module); }
