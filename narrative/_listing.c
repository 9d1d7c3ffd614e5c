/* narrative._listing: one directory listed and its non-directories lstat-ed in one call.
 *
 * The snapshot walk (narrative/walker.py) does this for every directory of the workspace; in
 * Python each entry costs a DirEntry, an os.stat_result (twenty fields, floats included) and a
 * tuple of its stat key, about as much CPU as the lstat itself. Here each entry costs its name
 * and, for a non-directory, the key tuple the walk keeps (docs/decisions.md, "The snapshot walk
 * lists directories in C"). The walk lists through os.scandir when this module is not built,
 * with the same results.
 *
 * list_dir(fd) -> (files, keys, subdirs, failed)
 *   fd       an open directory (not consumed: the caller closes it)
 *   files    names of the entries that are not directories (files, symlinks, others), in
 *            listing order, decoded as os.scandir decodes them (file system encoding,
 *            surrogateescape)
 *   keys     for each of files: (st_mtime_ns, st_ctime_ns, st_size, st_ino, st_mode) of its
 *            lstat, the values os.lstat gives
 *   subdirs  names of the directories, in listing order (never followed through a symlink)
 *   failed   (name, errno, type unknown) of entries that could not be lstat-ed: type unknown
 *            when the listing did not say whether the entry is a directory (the lstat was to
 *            find out); an entry gone since the listing (ENOENT) is left out, as if it had not
 *            been listed
 * Raises OSError if the directory cannot be read.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__APPLE__) /* the same timestamps under their BSD names */
#define st_mtim st_mtimespec
#define st_ctim st_ctimespec
#endif

/* seconds * 10**9 + nanoseconds, as os.stat_result's st_*_ns; Python arithmetic past int64
 * (a timestamp an agent set far out of range must give the value Python gives, not a wrap). */
static PyObject *nanoseconds(time_t sec, long nsec) {
    long long scaled, total;
    if (!__builtin_mul_overflow((long long)sec, 1000000000LL, &scaled) &&
        !__builtin_add_overflow(scaled, (long long)nsec, &total)) {
        return PyLong_FromLongLong(total);
    }
    PyObject *s = PyLong_FromLongLong((long long)sec);
    PyObject *billion = PyLong_FromLong(1000000000L);
    PyObject *n = PyLong_FromLong(nsec);
    PyObject *product = (s && billion) ? PyNumber_Multiply(s, billion) : NULL;
    PyObject *result = (product && n) ? PyNumber_Add(product, n) : NULL;
    Py_XDECREF(s);
    Py_XDECREF(billion);
    Py_XDECREF(n);
    Py_XDECREF(product);
    return result;
}

static PyObject *stat_key(const struct stat *st) {
    PyObject *mtime = nanoseconds(st->st_mtim.tv_sec, st->st_mtim.tv_nsec);
    PyObject *ctime = nanoseconds(st->st_ctim.tv_sec, st->st_ctim.tv_nsec);
    PyObject *key = NULL;
    if (mtime && ctime) {
        key = Py_BuildValue("(OOLKk)", mtime, ctime, (long long)st->st_size,
                            (unsigned long long)st->st_ino, (unsigned long)st->st_mode);
    }
    Py_XDECREF(mtime);
    Py_XDECREF(ctime);
    return key;
}

/* Appends (name, error, type unknown) to failed; 0 on success. */
static int note_failure(PyObject *failed, PyObject *name, int error, int type_unknown) {
    PyObject *item = Py_BuildValue("(OiO)", name, error, type_unknown ? Py_True : Py_False);
    if (item == NULL) return -1;
    int status = PyList_Append(failed, item);
    Py_DECREF(item);
    return status;
}

/* Sorts one entry into the lists; 0 on success, -1 with a Python error set. */
static int take_entry(int fd, const struct dirent *entry, PyObject *files, PyObject *keys,
                      PyObject *subdirs, PyObject *failed) {
    const char *raw = entry->d_name;
    struct stat st;
    int error = 0, stated = 0, is_dir = entry->d_type == DT_DIR;
    if (entry->d_type == DT_UNKNOWN || !is_dir) {
        /* the type is not in the listing (some file systems), or a non-directory's key */
        int rc;
        Py_BEGIN_ALLOW_THREADS /* errno is read before the GIL is taken back */
        rc = fstatat(fd, raw, &st, AT_SYMLINK_NOFOLLOW);
        error = rc != 0 ? errno : 0;
        Py_END_ALLOW_THREADS
        if (rc != 0) {
            if (error == ENOENT) return 0; /* gone since the listing */
        } else {
            stated = 1;
            is_dir = S_ISDIR(st.st_mode);
        }
    }
    PyObject *name = PyUnicode_DecodeFSDefault(raw);
    if (name == NULL) return -1;
    int status;
    if (error != 0) {
        status = note_failure(failed, name, error, entry->d_type == DT_UNKNOWN);
    } else if (is_dir) {
        status = PyList_Append(subdirs, name);
    } else {
        PyObject *key = stated ? stat_key(&st) : NULL;
        status = (key != NULL && PyList_Append(files, name) == 0 && PyList_Append(keys, key) == 0)
                     ? 0
                     : -1;
        Py_XDECREF(key);
    }
    Py_DECREF(name);
    return status;
}

static PyObject *list_dir(PyObject *module, PyObject *arg) {
    (void)module;
    long given = PyLong_AsLong(arg);
    if (given == -1 && PyErr_Occurred()) return NULL;
    if (given < 0 || given > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "list_dir: not a file descriptor");
        return NULL;
    }
    int fd = (int)given;
    int own, error;
    Py_BEGIN_ALLOW_THREADS
    own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    error = errno;
    Py_END_ALLOW_THREADS
    if (own < 0) {
        errno = error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    DIR *dir = fdopendir(own); /* takes own: closedir closes it */
    if (dir == NULL) {
        PyErr_SetFromErrno(PyExc_OSError);
        close(own);
        return NULL;
    }
    /* the duplicate shares the file offset: start at the top whatever read it before */
    rewinddir(dir);
    PyObject *files = PyList_New(0), *keys = PyList_New(0);
    PyObject *subdirs = PyList_New(0), *failed = PyList_New(0);
    PyObject *result = NULL;
    if (files == NULL || keys == NULL || subdirs == NULL || failed == NULL) goto done;
    for (;;) {
        struct dirent *entry;
        Py_BEGIN_ALLOW_THREADS
        errno = 0; /* readdir's only way to tell the end from an error */
        entry = readdir(dir);
        error = errno;
        Py_END_ALLOW_THREADS
        if (entry == NULL) {
            if (error != 0) {
                errno = error;
                PyErr_SetFromErrno(PyExc_OSError);
                goto done;
            }
            break;
        }
        const char *raw = entry->d_name;
        if (raw[0] == '.' && (raw[1] == '\0' || (raw[1] == '.' && raw[2] == '\0'))) continue;
        if (take_entry(dirfd(dir), entry, files, keys, subdirs, failed) != 0) goto done;
    }
    result = PyTuple_Pack(4, files, keys, subdirs, failed);
done:
    rewinddir(dir); /* leave the shared offset where the caller's descriptor had it: the top */
    closedir(dir);
    Py_XDECREF(files);
    Py_XDECREF(keys);
    Py_XDECREF(subdirs);
    Py_XDECREF(failed);
    return result;
}

static PyMethodDef listing_methods[] = {
    {"list_dir", list_dir, METH_O,
     "list_dir(fd) -> (files, keys, subdirs, failed): list a directory, lstat its "
     "non-directories"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef listing_module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_listing",
    .m_doc = "One directory listed and its non-directories lstat-ed in one call (narrative.scan).",
    .m_size = -1,
    .m_methods = listing_methods,
};

PyMODINIT_FUNC PyInit__listing(void) { return PyModule_Create(&listing_module); }
